// peer-bun: a comparison peer for agentwire, written the way a Bun team after speed
// would: one `Bun.serve` (uWebSockets inside) for HTTP and WebSocket, the HS256 check
// with node:crypto (no JWT package), one pub/sub topic per user, and one
// `server.publish(topic, frame)` per event: uWebSockets writes the frame to every
// subscriber from native code.
//
// It speaks the same subset of agentwire's protocol (docs/PROTOCOL.md) as
// tools/peers/node/server.js, and nothing more:
// - GET /ws upgrade with a JWT (HS256, `exp` required, 5 s clock tolerance) from
//   `Authorization: Bearer` or `?token=`; 401 `invalid_token` before the upgrade
//   otherwise;
// - first frame `connected` (connection_id, user_id, mode, thread_id, epoch, last_seq,
//   resumed), then the user's events as
//   {"type","seq","user_id","thread_id","run_id","agent_name","ts","data"} with a
//   per-user seq from 1;
// - POST /api/events with `Authorization: Bearer <publish_key>`: one event or an array
//   of at most 1000; 202 {"accepted":N}, 400 bad_event with the index, 401, 413;
// - GET /health.
// Not implemented: resume/replay, runs, client messages, limits. Slow consumers: a
// socket with more than 1 MiB unsent is closed by Bun itself (`backpressureLimit` with
// `closeOnBackpressureLimit`), the same bound as agentwire's and the node peer's
// 1013 rule, except that Bun ends the connection without a close frame (checked: a
// client that stopped reading got 3.8 MiB, then EOF). Bun pings idle sockets and closes
// those silent for 120 s (its default; the load clients answer pings).
//
// Settings: --listen HOST:PORT (default 127.0.0.1:8080), AGENTWIRE_JWT_SECRET (or
// --jwt-secret), AGENTWIRE_PUBLISH_KEY (or --publish-key). Stops on SIGTERM / SIGINT.
// Run with the Bun binary from the npm package (tools/peers/setup.sh --only bun links
// it as target/peer-bun): `target/peer-bun tools/peers/bun/server.js --listen ...`.
'use strict';

const crypto = require('node:crypto');

const MAX_BODY = 1024 * 1024;
const MAX_BATCH = 1000;
const MAX_PENDING = 1024 * 1024;
const TYPE_RE = /^[a-z][a-z0-9_]{0,63}$/;
const CLOCK_TOLERANCE_S = 5;

function flag(name) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const listen = flag('listen') || '127.0.0.1:8080';
const secret = flag('jwt-secret') || process.env.AGENTWIRE_JWT_SECRET;
const publishKey = flag('publish-key') || process.env.AGENTWIRE_PUBLISH_KEY;
if (!secret) {
  console.error('peer-bun: AGENTWIRE_JWT_SECRET (or --jwt-secret) is required');
  process.exit(2);
}
const sep = listen.lastIndexOf(':');
const host = listen.slice(0, sep);
const port = Number(listen.slice(sep + 1));
const epoch = crypto.randomBytes(4).toString('hex');

/** user id -> { seq } (one entry per user seen; like the node peer, never dropped) */
const users = new Map();
/** every open socket (for the 1001 on stop) */
const sockets = new Set();
let nextConn = 1;

function user(id) {
  let u = users.get(id);
  if (!u) {
    u = { seq: 0 };
    users.set(id, u);
  }
  return u;
}

function topic(id) {
  return `u:${id}`;
}

function json(status, body) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { 'Content-Type': 'application/json' },
  });
}

/** The claims of a valid HS256 token (signature, `exp` required, `nbf` if present), or null. */
function verify(token) {
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  try {
    const header = JSON.parse(Buffer.from(parts[0], 'base64url').toString('utf8'));
    if (!header || header.alg !== 'HS256') return null;
    const want = crypto.createHmac('sha256', secret).update(`${parts[0]}.${parts[1]}`).digest();
    const got = Buffer.from(parts[2], 'base64url');
    if (got.length !== want.length || !crypto.timingSafeEqual(got, want)) return null;
    const claims = JSON.parse(Buffer.from(parts[1], 'base64url').toString('utf8'));
    if (!claims || typeof claims !== 'object') return null;
    const now = Date.now() / 1000;
    if (typeof claims.exp !== 'number' || now >= claims.exp + CLOCK_TOLERANCE_S) return null;
    if (claims.nbf !== undefined && (typeof claims.nbf !== 'number' || now + CLOCK_TOLERANCE_S < claims.nbf)) {
      return null;
    }
    return claims;
  } catch {
    return null;
  }
}

function checkEvent(e) {
  if (e === null || typeof e !== 'object' || Array.isArray(e)) return 'not an object';
  if (typeof e.type !== 'string' || !TYPE_RE.test(e.type)) {
    return 'type must match ^[a-z][a-z0-9_]{0,63}$';
  }
  if (typeof e.user_id !== 'string' || e.user_id.length === 0 || Buffer.byteLength(e.user_id) > 128) {
    return 'user_id must be 1-128 bytes';
  }
  if (e.thread_id !== undefined && e.thread_id !== null && typeof e.thread_id !== 'string') {
    return 'thread_id must be a string or null';
  }
  if (typeof e.run_id !== 'string' || !e.run_id || typeof e.agent_name !== 'string' || !e.agent_name) {
    return 'run_id and agent_name must be non-empty strings';
  }
  return null;
}

function route(server, events) {
  const ts = Date.now();
  for (const e of events) {
    const u = user(e.user_id);
    u.seq += 1;
    const frame = JSON.stringify({
      type: e.type,
      seq: u.seq,
      user_id: e.user_id,
      thread_id: e.thread_id ?? null,
      run_id: e.run_id,
      agent_name: e.agent_name,
      ts,
      data: e.data === undefined ? {} : e.data,
    });
    server.publish(topic(e.user_id), frame);
  }
}

async function publish(req, server) {
  if (!publishKey) return json(404, { error: 'not_found', message: 'publishing is off' });
  if (req.headers.get('authorization') !== `Bearer ${publishKey}`) {
    return json(401, { error: 'invalid_key', message: 'bad publish key' });
  }
  const declared = Number(req.headers.get('content-length') || 0);
  if (declared > MAX_BODY) return json(413, { error: 'payload_too_large', message: 'body over 1 MiB' });
  const raw = await req.arrayBuffer();
  if (raw.byteLength > MAX_BODY) return json(413, { error: 'payload_too_large', message: 'body over 1 MiB' });
  let body;
  try {
    body = JSON.parse(Buffer.from(raw).toString('utf8'));
  } catch (err) {
    return json(400, { error: 'bad_event', message: String(err.message), index: 0 });
  }
  const events = Array.isArray(body) ? body : [body];
  if (events.length > MAX_BATCH) {
    return json(413, { error: 'payload_too_large', message: 'more than 1000 events' });
  }
  for (let i = 0; i < events.length; i++) {
    const why = checkEvent(events[i]);
    if (why) return json(400, { error: 'bad_event', message: why, index: i });
  }
  route(server, events);
  return json(202, { accepted: events.length });
}

function upgrade(req, server, url) {
  const auth = req.headers.get('authorization');
  const token = auth && auth.startsWith('Bearer ') ? auth.slice(7).trim() : url.searchParams.get('token');
  const claims = verify(token || '');
  if (!claims) return json(401, { error: 'invalid_token', message: 'missing or invalid token' });
  const sub = claims.sub;
  if (typeof sub !== 'string' || sub.length === 0 || Buffer.byteLength(sub) > 128) {
    return json(401, { error: 'invalid_token', message: 'bad sub' });
  }
  const id = `c${(nextConn++).toString(16).padStart(8, '0')}`;
  if (server.upgrade(req, { data: { sub, id } })) return undefined;
  return json(400, { error: 'bad_request', message: 'not a WebSocket upgrade' });
}

const server = Bun.serve({
  hostname: host,
  port,
  // Bodies over 1 MiB are refused 413 by publish(); this is Bun's own hard bound.
  maxRequestBodySize: 2 * MAX_BODY,
  fetch(req, srv) {
    const url = new URL(req.url);
    const path = url.pathname;
    if (req.method === 'GET' && path === '/ws') return upgrade(req, srv, url);
    if (req.method === 'GET' && (path === '/health' || path === '/ws/health')) {
      return json(200, { status: 'healthy' });
    }
    if (req.method === 'POST' && path === '/api/events') return publish(req, srv);
    return json(404, { error: 'not_found', message: 'unknown path' });
  },
  websocket: {
    maxPayloadLength: 64 * 1024,
    backpressureLimit: MAX_PENDING,
    closeOnBackpressureLimit: true,
    perMessageDeflate: false,
    idleTimeout: 120,
    open(ws) {
      const { sub, id } = ws.data;
      const u = user(sub);
      ws.send(JSON.stringify({
        type: 'connected',
        connection_id: id,
        user_id: sub,
        mode: 'main',
        thread_id: null,
        epoch,
        last_seq: u.seq,
        resumed: null,
      }));
      ws.subscribe(topic(sub));
      sockets.add(ws);
    },
    message() {},
    close(ws) {
      sockets.delete(ws);
    },
  },
});

console.error(`peer-bun: listening on ${server.hostname}:${server.port} (bun ${Bun.version})`);

function stop() {
  for (const ws of sockets) ws.close(1001, 'going away');
  server.stop();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
