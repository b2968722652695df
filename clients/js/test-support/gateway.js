// Test support for clients/js: starts the REAL agentwire binary (never a mock) on a free
// port, mints HS256 tokens with node:crypto, publishes events through POST /api/events,
// and waits for conditions with deadlines. Not a test file itself (node --test runs every
// .js under test/, so this lives beside it).

import { spawn } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { fileURLToPath } from "node:url";
import path from "node:path";
import WebSocket from "ws";

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../../..");
export const BIN = process.env.AGENTWIRE_BIN
  ? path.resolve(process.env.AGENTWIRE_BIN)
  : path.join(ROOT, "target/release/agentwire");

export { WebSocket };

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** An HS256 JWT for `sub`, expiring `ttlS` seconds from now (negative: already expired). */
export function mintToken(secret, sub, ttlS = 3600) {
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const iat = Math.floor(Date.now() / 1000);
  const payload = b64url(JSON.stringify({ sub, iat, exp: iat + ttlS }));
  const sig = createHmac("sha256", secret).update(`${header}.${payload}`).digest("base64url");
  return `${header}.${payload}.${sig}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/**
 * Resolve when `pred()` is truthy (checked every 10 ms), or reject after `timeoutMs`
 * with `what` and the last value of `describe()` in the message.
 */
export async function waitFor(pred, what, timeoutMs = 8000, describe = () => "") {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = pred();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what} ${describe()}`);
    await sleep(10);
  }
}

/** A unique user id per test, so tests on one gateway never see each other's events. */
export function uniqueUser(label) {
  return `${label}-${randomBytes(4).toString("hex")}`;
}

export class Gateway {
  /**
   * @param {string[]} extraArgs more `--setting value` flags
   * @param {{demoAgent?: boolean}} opts
   */
  constructor(extraArgs = [], { demoAgent = true } = {}) {
    this.secret = `js-test-secret-${randomBytes(16).toString("hex")}`;
    this.publishKey = `js-publish-${randomBytes(12).toString("hex")}`;
    this.extraArgs = extraArgs;
    this.demoAgent = demoAgent;
    this.port = null;
    this.proc = null;
    this.log = [];
  }

  get base() {
    return `http://127.0.0.1:${this.port}`;
  }
  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  token(sub, ttlS = 3600) {
    return mintToken(this.secret, sub, ttlS);
  }

  /** Start on a random free port in 20000-29999 (a new one when the port is taken). */
  async start({ samePort = false } = {}) {
    for (let tries = 0; tries < 20; tries++) {
      if (!samePort || this.port === null) this.port = 20000 + Math.floor(Math.random() * 10000);
      if (await this._try()) return this;
      if (samePort) await sleep(100);
    }
    throw new Error(`the gateway did not start; last log:\n${this.log.slice(-20).join("\n")}`);
  }

  async _try() {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("AGENTWIRE_")));
    env.RUST_LOG = env.RUST_LOG || "warn";
    const args = [
      "--listen", `127.0.0.1:${this.port}`,
      "--jwt-secret", this.secret,
      "--publish-key", this.publishKey,
      "--demo-agent", String(this.demoAgent),
      ...this.extraArgs,
    ];
    const proc = spawn(BIN, args, { env, stdio: ["ignore", "pipe", "pipe"] });
    this.proc = proc;
    let exited = false;
    proc.on("exit", () => {
      exited = true;
    });
    proc.on("error", (e) => {
      exited = true;
      this.log.push(String(e));
    });
    const keep = (chunk) => {
      for (const line of String(chunk).split("\n")) if (line) this.log.push(line);
      if (this.log.length > 200) this.log.splice(0, this.log.length - 200);
    };
    proc.stdout.on("data", keep);
    proc.stderr.on("data", keep);
    const deadline = Date.now() + 10000;
    while (Date.now() < deadline && !exited) {
      try {
        const r = await fetch(`${this.base}/health`);
        if (r.ok) {
          this.health = await r.json();
          return true;
        }
      } catch {
        // not listening yet
      }
      await sleep(25);
    }
    if (!exited) proc.kill("SIGKILL");
    return false;
  }

  /** SIGTERM, then SIGKILL after 3 s; resolves when the process is gone. */
  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const gone = new Promise((r) => proc.once("exit", r));
    proc.kill("SIGTERM");
    const t = setTimeout(() => proc.kill("SIGKILL"), 3000);
    await gone;
    clearTimeout(t);
  }

  /** Stop and start again on the same port: a new process, so a new epoch. */
  async restart() {
    await this.stop();
    await this.start({ samePort: true });
  }

  /** POST /api/events; returns the parsed 202 answer, throws on anything else. */
  async publish(events) {
    const r = await fetch(`${this.base}/api/events`, {
      method: "POST",
      headers: { authorization: `Bearer ${this.publishKey}`, "content-type": "application/json" },
      body: JSON.stringify(events),
    });
    const body = await r.text();
    if (r.status !== 202) throw new Error(`publish answered ${r.status}: ${body}`);
    return JSON.parse(body);
  }

  async stats() {
    const r = await fetch(`${this.base}/ws/stats`);
    return r.json();
  }

  /** A raw `ws` connection for `sub` (for evicting a client); resolves on `connected`. */
  rawConnect(sub, query = "") {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(`${this.wsUrl}?token=${this.token(sub)}${query}`);
      const frames = [];
      ws.frames = frames;
      ws.closeCode = null;
      ws.on("message", (data) => {
        const f = JSON.parse(String(data));
        frames.push(f);
        if (f.type === "connected") resolve(ws);
      });
      ws.on("close", (code) => {
        ws.closeCode = code;
        reject(new Error(`closed ${code} before connected`));
      });
      ws.on("error", reject);
    });
  }
}

/** Events of one run, as the publish API takes them. */
export function runEvents(user, runId, types, { thread = null, agent = "test_agent", data = (t, i) => ({ i }) } = {}) {
  return types.map((type, i) => ({ type, user_id: user, thread_id: thread, run_id: runId, agent_name: agent, data: data(type, i) }));
}

/**
 * Record what a client shows: events (and their seqs), statuses, resets, connected
 * frames, errors.
 */
export function record(client) {
  const rec = { events: [], seqs: [], statuses: [], resets: [], connected: [], errors: [], closes: [] };
  client.on("event", (ev) => {
    rec.events.push(ev);
    rec.seqs.push(ev.seq);
  });
  client.on("status", (s, d) => {
    rec.statuses.push(s);
    if (d && d.code !== undefined) rec.closes.push(d.code);
  });
  client.on("reset", (info) => rec.resets.push(info));
  client.on("connected", (f) => rec.connected.push(f));
  client.on("error", (e) => rec.errors.push(e));
  return rec;
}

/** Every seq strictly greater than the one before. */
export function strictlyIncreasing(seqs) {
  return seqs.every((s, i) => i === 0 || s > seqs[i - 1]);
}

/** Drop the client's TCP connection without a close handshake (Node `ws` internals). */
export function killSocket(client) {
  const ws = client.socket;
  if (!ws || !ws._socket) throw new Error("the client has no open socket");
  ws._socket.destroy();
}
