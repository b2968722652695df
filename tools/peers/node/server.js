// peer-node: a comparison peer for agentwire, written the way a Node team would: one
// http.Server, `ws` (noServer) for the upgrade, `jsonwebtoken` for HS256, a Map from
// user id to that user's sockets, and ws.send() per recipient.
//
// It speaks the subset of agentwire's protocol (docs/PROTOCOL.md) that the load
// generator uses, and nothing more:
// - GET /ws upgrade with a JWT (HS256) from `Authorization: Bearer` or `?token=`; 401
//   `invalid_token` before the upgrade otherwise;
// - first frame `connected` (connection_id, user_id, mode, thread_id, epoch, last_seq,
//   resumed), then the user's events as
//   {"type","seq","user_id","thread_id","run_id","agent_name","ts","data"} with a
//   per-user seq from 1;
// - POST /api/events with `Authorization: Bearer <publish_key>`: one event or an array
//   of at most 1000; 202 {"accepted":N}, 400 bad_event with the index, 401, 413;
// - GET /health.
// Not implemented: resume/replay, runs, heartbeats, client messages, limits. A socket
// with more than 1 MiB unsent is closed with 1013 (agentwire's slow-consumer rule).
//
// Settings: --listen HOST:PORT (default 127.0.0.1:8080), AGENTWIRE_JWT_SECRET (or
// --jwt-secret), AGENTWIRE_PUBLISH_KEY (or --publish-key). Stops on SIGTERM / SIGINT.
'use strict';

const http = require('node:http');
const crypto = require('node:crypto');
const { WebSocketServer } = require('ws');
const jwt = require('jsonwebtoken');

const MAX_BODY = 1024 * 1024;
const MAX_BATCH = 1000;
const MAX_PENDING = 1024 * 1024;
const TYPE_RE = /^[a-z][a-z0-9_]{0,63}$/;

function flag(name) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

const listen = flag('listen') || '127.0.0.1:8080';
const secret = flag('jwt-secret') || process.env.AGENTWIRE_JWT_SECRET;
const publishKey = flag('publish-key') || process.env.AGENTWIRE_PUBLISH_KEY;
if (!secret) {
  console.error('peer-node: AGENTWIRE_JWT_SECRET (or --jwt-secret) is required');
  process.exit(2);
}
const sep = listen.lastIndexOf(':');
const host = listen.slice(0, sep);
const port = Number(listen.slice(sep + 1));
const epoch = crypto.randomBytes(4).toString('hex');

/** user id -> { seq, sockets: Set<WebSocket> } */
const users = new Map();
let nextConn = 1;

function user(id) {
  let u = users.get(id);
  if (!u) {
    u = { seq: 0, sockets: new Set() };
    users.set(id, u);
  }
  return u;
}

function reply(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(text),
  });
  res.end(text);
}

function refuse(socket, status, reason, code, message) {
  const text = JSON.stringify({ error: code, message });
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(text)}\r\nConnection: close\r\n\r\n${text}`,
  );
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

function route(events) {
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
    for (const ws of u.sockets) {
      if (ws.bufferedAmount > MAX_PENDING) {
        u.sockets.delete(ws);
        ws.close(1013, 'slow consumer');
        continue;
      }
      ws.send(frame);
    }
  }
}

function publish(req, res) {
  if (!publishKey) return reply(res, 404, { error: 'not_found', message: 'publishing is off' });
  const auth = req.headers.authorization || '';
  if (auth !== `Bearer ${publishKey}`) {
    return reply(res, 401, { error: 'invalid_key', message: 'bad publish key' });
  }
  const chunks = [];
  let size = 0;
  let tooLarge = false;
  req.on('data', (c) => {
    size += c.length;
    if (size > MAX_BODY) tooLarge = true;
    else chunks.push(c);
  });
  req.on('end', () => {
    if (tooLarge) return reply(res, 413, { error: 'payload_too_large', message: 'body over 1 MiB' });
    let body;
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch (err) {
      return reply(res, 400, { error: 'bad_event', message: String(err.message), index: 0 });
    }
    const events = Array.isArray(body) ? body : [body];
    if (events.length > MAX_BATCH) {
      return reply(res, 413, { error: 'payload_too_large', message: 'more than 1000 events' });
    }
    for (let i = 0; i < events.length; i++) {
      const why = checkEvent(events[i]);
      if (why) return reply(res, 400, { error: 'bad_event', message: why, index: i });
    }
    route(events);
    reply(res, 202, { accepted: events.length });
  });
}

const server = http.createServer((req, res) => {
  const path = req.url.split('?')[0];
  if (req.method === 'GET' && (path === '/health' || path === '/ws/health')) {
    return reply(res, 200, { status: 'healthy' });
  }
  if (req.method === 'POST' && path === '/api/events') return publish(req, res);
  reply(res, 404, { error: 'not_found', message: 'unknown path' });
});
server.keepAliveTimeout = 60_000;

const wss = new WebSocketServer({ noServer: true, maxPayload: 64 * 1024, perMessageDeflate: false });

server.on('upgrade', (req, socket, head) => {
  const url = new URL(req.url, 'http://peer');
  if (url.pathname !== '/ws') return refuse(socket, 404, 'Not Found', 'not_found', 'unknown path');
  const auth = req.headers.authorization;
  const token = auth && auth.startsWith('Bearer ') ? auth.slice(7).trim() : url.searchParams.get('token');
  let sub;
  try {
    const claims = jwt.verify(token || '', secret, { algorithms: ['HS256'], clockTolerance: 5 });
    sub = claims.sub;
    if (typeof claims.exp !== 'number') throw new Error('exp required');
  } catch {
    return refuse(socket, 401, 'Unauthorized', 'invalid_token', 'missing or invalid token');
  }
  if (typeof sub !== 'string' || sub.length === 0 || Buffer.byteLength(sub) > 128) {
    return refuse(socket, 401, 'Unauthorized', 'invalid_token', 'bad sub');
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    socket.setNoDelay(true);
    const u = user(sub);
    const id = `c${(nextConn++).toString(16).padStart(8, '0')}`;
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
    u.sockets.add(ws);
    ws.on('close', () => u.sockets.delete(ws));
    ws.on('error', () => u.sockets.delete(ws));
  });
});

server.listen(port, host, () => {
  console.error(`peer-node: listening on ${host}:${server.address().port}`);
});

function stop() {
  for (const ws of wss.clients) ws.close(1001, 'going away');
  server.close();
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
