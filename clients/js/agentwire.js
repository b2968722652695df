// agentwire.js: the browser and Node client of the agentwire gateway (PROTOCOL.md 10.1).
//
// One ES module, no runtime dependencies. It keeps one WebSocket to the gateway open for
// one user: reconnects with exponential backoff and full jitter, resumes with `epoch`
// and `last_seq` (dropping duplicates, emitting `reset` when the gateway cannot resume),
// refreshes the token before it expires, sends messages and cancels, and aggregates
// each run's events into a `RunState` (status, thinking steps, tool calls, streamed text).
//
// Browsers: `globalThis.WebSocket` is used. Node 20 has none: pass one, for example
// `new AgentwireClient({ ..., WebSocket: (await import("ws")).WebSocket })`.
// See README.md in this folder for the whole API, the rules and the bounds.

/** Close codes the gateway uses (PROTOCOL.md sections 5 and 12). */
export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  POLICY: 1008,
  TOO_BIG: 1009,
  SLOW_CONSUMER: 1013,
  TOKEN_EXPIRED: 4001,
  EVICTED: 4002,
  OTHER_USER: 4003,
  REVOKED: 4004,
});

/** Close code the client uses itself when it drops a silent connection. */
const CLIENT_DROP = 4000;

/** Statuses a client goes through, in `status` events and the `status` getter. */
export const Status = Object.freeze({
  CONNECTING: "connecting",
  OPEN: "open",
  RECONNECTING: "reconnecting",
  EVICTED: "evicted",
  CLOSED: "closed",
});

const DEFAULTS = Object.freeze({
  backoffBaseMs: 1000, // first retry within 1 s (full jitter: uniform in [0, base])
  backoffMaxMs: 30000, // retries never wait longer than this
  maxRuns: 200, // RunStates kept; past it the oldest ended runs go first
  maxEventsPerRun: 1000, // events kept per run (newest), also bounds thinking and tools
  maxTextChars: 1000000, // characters of streamed text kept per run
  maxQueued: 256, // messages waiting for a connection (send / cancel before open)
  requestTimeoutMs: 30000, // an unanswered send or cancel is rejected after this
  refreshFraction: 0.8, // refresh at this fraction of the token's remaining life
  refreshLeadMs: 5000, // ... and at least this long before it expires
  refreshRetryMs: 2000, // after `rate_limited` / `invalid_token` / a failed token call
});

// Frames the gateway writes itself; everything else carrying a `seq` is an event.
const CONTROL_TYPES = new Set([
  "connected",
  "pong",
  "ack",
  "error",
  "refreshed",
  "cancel_requested",
]);

/** An error rejecting `send` / `cancel`, or reported by the `error` event. */
export class AgentwireError extends Error {
  /**
   * @param {string} code gateway error code (`no_agent`, `busy`, `too_large`,
   *   `not_found`, ...) or a client one (`disconnected`, `closed`, `evicted`,
   *   `timeout`, `queue_full`, `token`, `refused`)
   * @param {string} message
   * @param {object} [extra] fields copied onto the error (`ref`, `run_id`, `status`)
   */
  constructor(code, message, extra) {
    super(message || code);
    this.name = "AgentwireError";
    this.code = code;
    /** @type {string | null | undefined} the `ref` of a refused `send` */
    this.ref = undefined;
    /** @type {string | undefined} the run of a refused `cancel` */
    this.run_id = undefined;
    /** @type {number | undefined} HTTP status of a refused upgrade (Node only) */
    this.status = undefined;
    if (extra) Object.assign(this, extra);
  }
}

/** Milliseconds since the Unix epoch. */
const now = () => Date.now();

/** Read `exp` (seconds) from a JWT without verifying it; null when unreadable. */
export function tokenExpiry(token) {
  try {
    const part = String(token).split(".")[1];
    if (!part) return null;
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/");
    const padded = b64 + "===".slice((b64.length + 3) % 4);
    const json =
      typeof atob === "function"
        ? decodeURIComponent(
            Array.from(atob(padded), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""),
          )
        : globalThis.Buffer.from(padded, "base64").toString("utf8");
    const exp = JSON.parse(json).exp;
    return typeof exp === "number" && Number.isFinite(exp) ? exp : null;
  } catch {
    return null;
  }
}

function randomId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID().replace(/-/g, "").slice(0, 16);
  return Math.random().toString(16).slice(2, 18).padEnd(16, "0");
}

function textOf(data) {
  if (typeof data === "string") return data;
  if (data && typeof data === "object") {
    for (const k of ["thought", "text", "content", "message"]) {
      if (typeof data[k] === "string") return data[k];
    }
  }
  return data === undefined || data === null ? "" : JSON.stringify(data);
}

function report(err) {
  if (typeof globalThis.reportError === "function") globalThis.reportError(err);
  else if (globalThis.console) globalThis.console.error(err);
}

/**
 * A new run's state. Fields named as in PROTOCOL.md 10.1, plus a few extras.
 * @returns {import("./agentwire.js").RunState}
 */
function newRun(run_id, thread_id, agent_name) {
  return {
    run_id,
    thread_id: thread_id ?? null,
    agent_name: agent_name ?? null,
    status: "running",
    thinking: [],
    tools: [],
    text: "",
    events: [],
    started_ts: null,
    ended_ts: null,
    last_seq: 0,
    result: null,
    error: null,
    cancel_requested: false,
    partial: false,
    events_dropped: 0,
    text_truncated: false,
  };
}

export class AgentwireClient {
  /**
   * @param {import("./agentwire.js").AgentwireOptions} options
   */
  constructor(options) {
    if (!options || typeof options.url !== "string" || !options.url) {
      throw new TypeError("AgentwireClient: options.url (string) is required");
    }
    const tokenType = typeof options.token;
    if (tokenType !== "string" && tokenType !== "function") {
      throw new TypeError("AgentwireClient: options.token must be a string or a function");
    }
    this._o = { ...DEFAULTS, ...options };
    for (const k of Object.keys(DEFAULTS)) {
      const v = this._o[k];
      if (typeof v !== "number" || !(v >= 0)) throw new TypeError(`AgentwireClient: options.${k} must be a number >= 0`);
    }
    if (this._o.encoding !== undefined && this._o.encoding !== "agentwire" && this._o.encoding !== "agui") {
      throw new TypeError('AgentwireClient: options.encoding must be "agentwire" or "agui"');
    }
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._url(""); // throws now on a URL that could never work
    /** @type {Map<string, Set<Function>>} */
    this._listeners = new Map();
    /** @type {Map<string, object>} */
    this.runs = new Map();
    /** @type {import("./agentwire.js").ConnectionStatus} */
    this._status = Status.CLOSED;
    this._ws = null;
    this._stopped = true; // true until connect(), and after close()/4002/4003/4004
    this._attempt = 0; // failed attempts since the last `connected` frame
    this._timers = { reconnect: null, refresh: null, liveness: null };
    this._epoch = options.resume?.epoch ?? null;
    this._lastSeq = options.resume?.epoch ? Number(options.resume.lastSeq) || 0 : 0;
    // encoding "agui" (see _onAguiFrame): frames up to _aguiDropUpTo are a resume's
    // duplicates, as are the first n frames of seq _aguiSkip.seq; frames up to
    // _aguiStart open the stream; _aguiSeen counts the frames of seq _lastSeq shown.
    this._aguiDropUpTo = -1;
    this._aguiStart = 0;
    this._aguiFrom = 0;
    this._aguiSkip = null;
    this._aguiSeen = 0;
    this._connected = null; // the last `connected` frame
    this._token = null; // the token of the current connection
    this._tokenExp = null; // its expiry (seconds), updated by `refreshed`
    this._generation = 0; // bumps on every new socket: stale callbacks compare it
    this._lastClose = null;
    this._lastReceived = 0;
    this._refreshing = false;
    this._pendingToken = null;
    /** @type {null | (() => void)} */
    this._onOnline = null;
    this._outbox = []; // {msg, entry} waiting for an open connection
    this._pendingSends = new Map(); // ref -> entry
    this._pendingCancels = []; // entries in the order they went out
    this._refSerial = 0;
    this._stats = { duplicates: 0, reconnects: 0, resets: 0, refreshes: 0 };
  }

  // ------------------------------------------------------------------ public API

  /** Current status: "connecting" | "open" | "reconnecting" | "evicted" | "closed". */
  get status() {
    return this._status;
  }
  /** The gateway's epoch of the last `connected` frame (null before the first). */
  get epoch() {
    return this._epoch;
  }
  /** Highest `seq` handed to `event` listeners (or the gateway's at connect). */
  get lastSeq() {
    return this._lastSeq;
  }
  /** The last `connected` frame (connection_id, resumed, active_runs, ...), or null. */
  get connection() {
    return this._connected;
  }
  /** `exp` (epoch seconds) of the token the current connection holds, or null. */
  get tokenExp() {
    return this._tokenExp;
  }
  /** `{code, reason}` of the last close of a connection, or null. */
  get lastClose() {
    return this._lastClose;
  }
  /** Counters: duplicates dropped, reconnects, resets, refreshes. */
  get stats() {
    return { ...this._stats };
  }
  /** The underlying WebSocket while one exists (for diagnostics and tests). */
  get socket() {
    return this._ws;
  }

  /**
   * Listen to "event" | "run" | "status" | "reset" | "connected" | "error".
   * @returns {() => void} a function that removes the listener
   */
  on(name, fn) {
    if (typeof fn !== "function") throw new TypeError("listener must be a function");
    let set = this._listeners.get(name);
    if (!set) this._listeners.set(name, (set = new Set()));
    set.add(fn);
    return () => this.off(name, fn);
  }

  /** Remove a listener added with `on`. */
  off(name, fn) {
    this._listeners.get(name)?.delete(fn);
  }

  /** Open the connection (again, after `close()` or an eviction). No-op while open. */
  connect() {
    if (!this._stopped) return;
    if (!this._WebSocket) {
      throw new Error(
        "AgentwireClient: no WebSocket implementation; pass options.WebSocket (e.g. the `ws` package) on Node 20",
      );
    }
    this._stopped = false;
    this._attempt = 0;
    this._setStatus(Status.CONNECTING);
    this._watchNetwork(true);
    this._open();
  }

  /**
   * Send a user message; resolves with the gateway's `ack` (`{run_id, ref}`), rejects
   * with an AgentwireError (`code`: no_agent, busy, too_large, ... or disconnected,
   * closed, evicted, timeout, queue_full).
   */
  send(text, options = {}) {
    if (typeof text !== "string") return Promise.reject(new TypeError("send(text): text must be a string"));
    const ref = options.ref ?? `m${++this._refSerial}-${randomId().slice(0, 8)}`;
    const threadId = options.threadId !== undefined ? options.threadId : this._o.threadId ?? null;
    const msg = { type: "user_message", thread_id: threadId, text, ref };
    return this._request(msg, (entry) => {
      entry.ref = ref;
      entry.text = text;
      entry.threadId = threadId;
    });
  }

  /** Ask the worker to cancel a run; resolves on `cancel_requested` (`{run_id}`). */
  cancel(runId) {
    if (typeof runId !== "string" || !runId) return Promise.reject(new TypeError("cancel(run_id): run_id must be a string"));
    return this._request({ type: "cancel", run_id: runId }, (entry) => {
      entry.runId = runId;
    });
  }

  /** Close for good (until `connect()`): pending requests are rejected with `closed`. */
  close() {
    this._stop(Status.CLOSED, new AgentwireError("closed", "the client was closed"));
  }

  /** Drop the current connection and reconnect at once, resuming (e.g. on `online`). */
  reconnect() {
    if (this._stopped) return;
    this._dropSocket(CLIENT_DROP, "client reconnect");
    this._attempt = 0;
    this._afterClose({ code: CLIENT_DROP, reason: "client reconnect" }, true);
  }

  // ------------------------------------------------------------------ events out

  _emit(name, ...args) {
    const set = this._listeners.get(name);
    if (!set) return;
    for (const fn of [...set]) {
      try {
        fn(...args);
      } catch (err) {
        report(err);
      }
    }
  }

  _setStatus(status, detail) {
    if (this._status === status) return;
    this._status = status;
    this._emit("status", status, detail ?? null);
  }

  // ------------------------------------------------------------------ connection

  async _open() {
    const gen = ++this._generation;
    let token;
    try {
      // A fresh token for every attempt when `token` is a function: a browser cannot
      // tell a 401 refusal from a network failure (both close with 1006 before open),
      // so asking again each time is how a refused or expired token gets replaced.
      token = typeof this._o.token === "function" ? await this._o.token() : this._o.token;
      if (typeof token !== "string" || !token) throw new Error("the token function returned no string");
    } catch (err) {
      if (gen !== this._generation || this._stopped) return;
      this._emit("error", new AgentwireError("token", `token: ${err && err.message ? err.message : err}`));
      this._scheduleReconnect();
      return;
    }
    if (gen !== this._generation || this._stopped) return;
    let ws;
    try {
      const protocols = this._o.auth === "query" ? undefined : ["agentwire.v1", `bearer.${token}`];
      ws = protocols ? new this._WebSocket(this._url(token), protocols) : new this._WebSocket(this._url(token));
    } catch (err) {
      this._emit("error", new AgentwireError("refused", `cannot open the WebSocket: ${err && err.message}`));
      this._scheduleReconnect();
      return;
    }
    this._ws = ws;
    this._token = token;
    let opened = false;
    let httpStatus = null;
    ws.onopen = () => {
      opened = true;
    };
    ws.onerror = (ev) => {
      // Node's `ws` says "Unexpected server response: 401"; browsers say nothing.
      const m = /Unexpected server response: (\d{3})/.exec((ev && (ev.message || ev.error?.message)) || "");
      if (m) httpStatus = Number(m[1]);
    };
    ws.onmessage = (ev) => {
      if (gen !== this._generation) return;
      this._lastReceived = now();
      this._onFrame(ev.data);
    };
    ws.onclose = (ev) => {
      if (gen !== this._generation) return;
      this._ws = null;
      this._afterClose({ code: ev.code, reason: ev.reason || "", opened, httpStatus }, false);
    };
  }

  _url(token) {
    const base = typeof globalThis.location !== "undefined" ? globalThis.location.href : undefined;
    const url = new URL(this._o.url, base);
    if (url.protocol === "http:") url.protocol = "ws:";
    if (url.protocol === "https:") url.protocol = "wss:";
    const q = url.searchParams;
    if (this._o.mode) q.set("mode", this._o.mode);
    if (this._o.threadId !== undefined && this._o.threadId !== null) q.set("thread_id", this._o.threadId);
    if (this._o.encoding === "agui") q.set("encoding", "agui");
    if (this._epoch) {
      q.set("epoch", this._epoch);
      let from = this._lastSeq;
      this._aguiSkip = null;
      if (this._o.encoding === "agui" && this._aguiSeen > 0 && from > 0) {
        // One event can be several AG-UI frames, and a drop can cut between them: ask
        // for the last event again and skip the frames of it already shown (the
        // gateway translates it again the same way).
        from -= 1;
        this._aguiSkip = { seq: this._lastSeq, n: this._aguiSeen };
      }
      this._aguiFrom = from;
      q.set("last_seq", String(from));
    }
    if (this._o.auth === "query") q.set("token", token);
    return url.toString();
  }

  /** A close of the current socket (or a drop decided by the client). */
  _afterClose(close, byClient) {
    const { code, reason } = close;
    this._lastClose = { code, reason };
    this._clearTimer("refresh");
    this._clearTimer("liveness");
    this._refreshing = false;
    this._failInFlight(new AgentwireError("disconnected", `connection closed (${code}) before the answer`));
    if (this._stopped) return;
    const detail = { code, reason };
    if (code === CloseCode.EVICTED) {
      this._stop(Status.EVICTED, new AgentwireError("evicted", "evicted by a newer connection of the same user"), detail);
      return;
    }
    if (code === CloseCode.OTHER_USER || code === CloseCode.REVOKED) {
      this._stop(Status.CLOSED, new AgentwireError("closed", `closed by the gateway (${code})`), detail);
      return;
    }
    if (code === CloseCode.TOKEN_EXPIRED && typeof this._o.token !== "function") {
      // A fixed token cannot be renewed: reconnecting would only be refused.
      this._emit("error", new AgentwireError("token", "token expired (4001) and options.token is not a function"));
      this._stop(Status.CLOSED, new AgentwireError("token", "token expired and options.token is not a function"), detail);
      return;
    }
    if (!close.opened && close.httpStatus && [400, 403, 404, 426].includes(close.httpStatus)) {
      // Refusals a retry cannot cure (only visible on Node, where `ws` reports the status).
      this._emit("error", new AgentwireError("refused", `upgrade refused with HTTP ${close.httpStatus}`, { status: close.httpStatus }));
      this._stop(Status.CLOSED, new AgentwireError("closed", `upgrade refused with HTTP ${close.httpStatus}`), detail);
      return;
    }
    if (!close.opened && close.httpStatus === 401 && typeof this._o.token !== "function") {
      this._emit("error", new AgentwireError("token", "token refused (401) and options.token is not a function", { status: 401 }));
      this._stop(Status.CLOSED, new AgentwireError("closed", "token refused"), detail);
      return;
    }
    this._setStatus(Status.RECONNECTING, detail);
    this._scheduleReconnect(byClient || code === CloseCode.TOKEN_EXPIRED ? 0 : undefined);
  }

  _scheduleReconnect(delayMs) {
    if (this._stopped) return;
    this._setStatus(Status.RECONNECTING);
    const ceiling = Math.min(this._o.backoffMaxMs, this._o.backoffBaseMs * 2 ** Math.min(this._attempt, 30));
    const delay = delayMs ?? Math.floor(Math.random() * ceiling); // full jitter
    this._attempt += 1;
    this._clearTimer("reconnect");
    this._timers.reconnect = setTimeout(() => {
      this._timers.reconnect = null;
      if (this._stopped) return;
      this._stats.reconnects += 1;
      this._open();
    }, delay);
  }

  /** Stop reconnecting: status `evicted` or `closed`; everything pending is rejected. */
  _stop(status, err, detail) {
    this._stopped = true;
    this._watchNetwork(false);
    for (const k of Object.keys(this._timers)) this._clearTimer(k);
    this._dropSocket(CloseCode.NORMAL, "client closed");
    this._failInFlight(err);
    for (const { entry } of this._outbox.splice(0)) this._settle(entry, err);
    this._setStatus(status, detail);
  }

  /**
   * Browsers: when the network comes back (`online`), a client waiting out its backoff
   * retries at once instead of after up to 30 s.
   */
  _watchNetwork(on) {
    const target = globalThis.window;
    if (!target || typeof target.addEventListener !== "function") return;
    if (on && !this._onOnline) {
      this._onOnline = () => {
        if (this._stopped || this._status !== Status.RECONNECTING || this._timers.reconnect === null) return;
        this._clearTimer("reconnect");
        this._attempt = 0;
        this._stats.reconnects += 1;
        this._open();
      };
      target.addEventListener("online", this._onOnline);
    } else if (!on && this._onOnline) {
      target.removeEventListener("online", this._onOnline);
      this._onOnline = null;
    }
  }

  /** Let go of the current socket; `dead`: no close handshake (the peer is silent). */
  _dropSocket(code, reason, dead = false) {
    const ws = this._ws;
    this._ws = null;
    this._generation += 1; // the old socket's callbacks are ignored from now on
    if (ws) {
      try {
        // Node's `ws` would wait 30 s for the silent peer's close frame; browsers have no
        // terminate() and give up by themselves.
        const hard = /** @type {any} */ (ws).terminate;
        if (dead && typeof hard === "function") hard.call(ws);
        else ws.close(code, reason);
      } catch {
        // already closing or closed
      }
    }
  }

  _clearTimer(name) {
    if (this._timers[name] !== null) {
      clearTimeout(this._timers[name]);
      this._timers[name] = null;
    }
  }

  // ------------------------------------------------------------------ frames in

  _onFrame(raw) {
    if (typeof raw !== "string") return; // the gateway only sends text frames
    let frame;
    try {
      frame = JSON.parse(raw);
    } catch {
      return;
    }
    if (!frame || typeof frame !== "object") return;
    switch (frame.type) {
      case "connected":
        return this._onConnected(frame);
      case "ack":
        return this._onAck(frame);
      case "error":
        return this._onError(frame);
      case "cancel_requested":
        return this._onCancelRequested(frame);
      case "refreshed":
        return this._onRefreshed(frame);
      case "pong":
        return;
      default:
        return this._onEvent(frame);
    }
  }

  _onConnected(frame) {
    this._connected = frame;
    this._attempt = 0;
    this._tokenExp = typeof frame.token_exp === "number" ? frame.token_exp : tokenExpiry(this._token);
    const asked = this._epoch !== null;
    if (asked && frame.resumed === false) {
      // Events may be missing: start over from the gateway's state.
      this._stats.resets += 1;
      this.runs.clear();
      this._epoch = frame.epoch;
      this._lastSeq = Number(frame.last_seq) || 0;
      this._emit("reset", { epoch: frame.epoch, last_seq: this._lastSeq, connected: frame });
    } else if (!asked || frame.resumed !== true) {
      this._epoch = frame.epoch;
      this._lastSeq = Number(frame.last_seq) || 0;
    }
    // resumed:true keeps lastSeq: the replay of every event after it follows.
    // AG-UI frames: one event may be several frames with one seq, and a connection
    // opens with frames standing for events before it (seq <= its starting point):
    // after an exact resume those are what the client had (dropped); on a new stream
    // they open it (shown, not counted as events).
    const resumedExactly = asked && frame.resumed === true;
    this._aguiDropUpTo = resumedExactly ? this._aguiFrom : -1;
    this._aguiStart = resumedExactly ? this._aguiFrom : Number(frame.last_seq) || 0;
    if (!resumedExactly) this._aguiSkip = null;
    this._aguiSeen = 0;
    const touched = [];
    for (const a of Array.isArray(frame.active_runs) ? frame.active_runs : []) {
      if (!a || typeof a.run_id !== "string" || this.runs.has(a.run_id)) continue;
      const run = newRun(a.run_id, a.thread_id, a.agent_name);
      run.started_ts = a.started_ts ?? null;
      run.last_seq = a.last_seq ?? 0;
      run.partial = true; // events before this connection are not known
      this._addRun(run);
      touched.push(run);
    }
    const gen = this._generation;
    this._setStatus(Status.OPEN, { resumed: frame.resumed ?? null });
    this._emit("connected", frame);
    for (const run of touched) if (this.runs.get(run.run_id) === run) this._emit("run", run);
    if (gen !== this._generation || this._stopped) return; // a listener closed the client
    this._flushOutbox();
    this._scheduleRefresh();
    this._scheduleLiveness(frame.heartbeat_interval_ms);
  }

  _onEvent(frame) {
    if (CONTROL_TYPES.has(frame.type)) return;
    // AG-UI frames (encoding=agui) carry seq in metadata; they are passed through as is.
    const seq = typeof frame.seq === "number" ? frame.seq : frame.metadata?.seq;
    if (typeof seq !== "number") return;
    if (this._o.encoding === "agui") return this._onAguiFrame(frame, seq);
    if (seq <= this._lastSeq) {
      this._stats.duplicates += 1;
      return;
    }
    this._lastSeq = seq;
    this._emit("event", frame);
    if (this._o.encoding !== "agui" && typeof frame.run_id === "string") this._applyToRun(frame);
  }

  /** An AG-UI frame: drop what a resume already had, count the frames of the last event. */
  _onAguiFrame(frame, seq) {
    const skip = this._aguiSkip;
    if (seq <= this._aguiDropUpTo || (skip && seq === skip.seq && skip.n > 0)) {
      if (skip && seq === skip.seq && skip.n > 0) {
        skip.n -= 1;
        this._aguiSeen += 1;
      }
      this._stats.duplicates += 1;
      return;
    }
    if (seq > this._aguiStart) {
      if (seq > this._lastSeq) {
        this._lastSeq = seq;
        this._aguiSeen = 1;
      } else if (seq === this._lastSeq) {
        this._aguiSeen += 1;
      }
    }
    this._emit("event", frame);
  }

  _applyToRun(ev) {
    let run = this.runs.get(ev.run_id);
    if (!run) {
      run = newRun(ev.run_id, ev.thread_id, ev.agent_name);
      run.partial = ev.type !== "agent_started";
      this._addRun(run);
    }
    if (run.thread_id === null && ev.thread_id != null) run.thread_id = ev.thread_id;
    if (ev.agent_name) run.agent_name = ev.agent_name;
    run.last_seq = ev.seq;
    run.events.push(ev);
    if (run.events.length > this._o.maxEventsPerRun) {
      run.events.splice(0, run.events.length - this._o.maxEventsPerRun);
      run.events_dropped += 1;
    }
    const data = ev.data;
    switch (ev.type) {
      case "agent_started":
        run.started_ts = ev.ts ?? run.started_ts;
        run.partial = false;
        break;
      case "agent_thinking":
        run.thinking.push(textOf(data));
        if (run.thinking.length > this._o.maxEventsPerRun) run.thinking.shift();
        break;
      case "tool_executing":
        this._toolStart(run, data);
        break;
      case "tool_completed":
        this._toolEnd(run, data);
        break;
      case "text_delta": {
        const delta = data && typeof data === "object" ? data.delta ?? data.text ?? "" : typeof data === "string" ? data : "";
        const piece = typeof delta === "string" ? delta : String(delta);
        const room = this._o.maxTextChars - run.text.length;
        if (piece.length > room) run.text_truncated = true;
        if (room > 0) run.text += piece.length > room ? piece.slice(0, room) : piece;
        break;
      }
      case "agent_completed":
      case "agent_error": {
        const completed = ev.type === "agent_completed";
        const cancelled = !completed && (data?.reason === "cancelled" || run.cancel_requested);
        if (run.status === "running") run.status = completed ? "completed" : cancelled ? "cancelled" : "error";
        if (completed) run.result = data ?? null;
        else run.error = data ?? null;
        run.ended_ts = ev.ts ?? now();
        for (const t of run.tools) if (t.status === "running") t.status = completed ? "completed" : "error";
        break;
      }
      default:
        break;
    }
    this._emit("run", run);
  }

  _toolStart(run, data) {
    const d = data && typeof data === "object" ? data : {};
    run.tools.push({
      name: d.tool ?? d.name ?? d.tool_name ?? null,
      args: d.args ?? d.arguments ?? d.input ?? null,
      result: null,
      status: "running",
      tool_call_id: d.tool_call_id ?? null,
    });
    if (run.tools.length > this._o.maxEventsPerRun) {
      const i = run.tools.findIndex((t) => t.status !== "running");
      run.tools.splice(i >= 0 ? i : 0, 1);
    }
  }

  _toolEnd(run, data) {
    const d = data && typeof data === "object" ? data : {};
    const name = d.tool ?? d.name ?? d.tool_name ?? null;
    const id = d.tool_call_id ?? null;
    // Paired by tool_call_id when the worker gives one, else the oldest running call of
    // that tool name, else the oldest running call.
    let tool =
      (id !== null && run.tools.find((t) => t.tool_call_id === id && t.status === "running")) ||
      (name !== null && run.tools.find((t) => t.name === name && t.status === "running")) ||
      run.tools.find((t) => t.status === "running");
    if (!tool) {
      tool = { name, args: null, result: null, status: "running", tool_call_id: id };
      run.tools.push(tool);
      if (run.tools.length > this._o.maxEventsPerRun) run.tools.shift();
    }
    tool.result = d.result ?? d.output ?? (d.error !== undefined ? null : data ?? null);
    tool.status = d.error !== undefined && d.error !== null ? "error" : "completed";
    if (tool.status === "error") tool.error = d.error;
  }

  /**
   * Keep a new run, within maxRuns RunStates: to make room the oldest ended runs go
   * first, then (only when every kept run is still running) the oldest running one.
   */
  _addRun(run) {
    const max = Math.max(1, this._o.maxRuns);
    if (this.runs.size >= max) {
      for (const [id, r] of this.runs) {
        if (this.runs.size < max) break;
        if (r.status !== "running") this.runs.delete(id);
      }
      for (const id of this.runs.keys()) {
        if (this.runs.size < max) break;
        this.runs.delete(id);
      }
    }
    this.runs.set(run.run_id, run);
  }

  // ------------------------------------------------------------------ requests

  _request(msg, init) {
    return new Promise((resolve, reject) => {
      const entry = { msg, resolve, reject, timer: null, settled: false };
      init(entry);
      if (this._stopped) {
        const code = this._status === Status.EVICTED ? "evicted" : "closed";
        reject(new AgentwireError(code, `the client is ${this._status}; call connect() first`));
        return;
      }
      if (this._outbox.length >= this._o.maxQueued) {
        reject(new AgentwireError("queue_full", "too many messages waiting for a connection"));
        return;
      }
      this._outbox.push({ msg, entry });
      this._flushOutbox();
    });
  }

  /** Write waiting messages, at most maxQueued unanswered at a time. */
  _flushOutbox() {
    if (this._status !== Status.OPEN || !this._ws) return;
    while (this._outbox.length && this._pendingSends.size + this._pendingCancels.length < Math.max(1, this._o.maxQueued)) {
      const { msg, entry } = this._outbox.shift();
      if (entry.settled) continue;
      if (!this._write(msg)) {
        this._outbox.unshift({ msg, entry });
        return;
      }
      if (msg.type === "user_message") this._pendingSends.set(entry.ref, entry);
      else this._pendingCancels.push(entry);
      entry.timer = setTimeout(() => {
        this._pendingSends.delete(entry.ref);
        const i = this._pendingCancels.indexOf(entry);
        if (i >= 0) this._pendingCancels.splice(i, 1);
        this._settle(entry, new AgentwireError("timeout", `no answer within ${this._o.requestTimeoutMs} ms`));
      }, this._o.requestTimeoutMs);
    }
  }

  _write(msg) {
    try {
      this._ws.send(JSON.stringify(msg));
      return true;
    } catch {
      return false;
    }
  }

  _settle(entry, err, value) {
    if (entry.settled) return;
    entry.settled = true;
    if (entry.timer !== null) clearTimeout(entry.timer);
    if (err) entry.reject(err);
    else entry.resolve(value);
    if (this._outbox.length) this._flushOutbox(); // room for a waiting message
  }

  /** Requests written to a connection that is gone: their answers will never come. */
  _failInFlight(err) {
    for (const entry of this._pendingSends.values()) this._settle(entry, err);
    this._pendingSends.clear();
    for (const entry of this._pendingCancels.splice(0)) this._settle(entry, err);
  }

  _onAck(frame) {
    const entry = this._pendingSends.get(frame.ref);
    if (!entry) return;
    this._pendingSends.delete(frame.ref);
    const runId = frame.run_id;
    const filter = this._o.threadId ?? null;
    if (typeof runId === "string" && !this.runs.has(runId) && (filter === null || entry.threadId === filter)) {
      // The run's events follow; show it from now on (its thread reaches this connection).
      const run = newRun(runId, entry.threadId, null);
      run.started_ts = now();
      this._addRun(run);
      this._emit("run", run);
    }
    this._settle(entry, null, { run_id: runId, ref: frame.ref });
  }

  _onCancelRequested(frame) {
    const i = this._pendingCancels.findIndex((e) => e.runId === frame.run_id);
    const run = this.runs.get(frame.run_id);
    if (run && !run.cancel_requested) {
      run.cancel_requested = true;
      this._emit("run", run);
    }
    if (i < 0) return;
    const [entry] = this._pendingCancels.splice(i, 1);
    this._settle(entry, null, { run_id: frame.run_id });
  }

  _onError(frame) {
    const err = new AgentwireError(frame.code || "error", frame.message || frame.code || "error", {
      ref: frame.ref ?? null,
    });
    if (frame.ref !== undefined && frame.ref !== null && this._pendingSends.has(frame.ref)) {
      const entry = this._pendingSends.get(frame.ref);
      this._pendingSends.delete(frame.ref);
      this._settle(entry, err);
      return;
    }
    if (frame.code === "not_found" && this._pendingCancels.length) {
      // The gateway answers messages in order and this is the only error a cancel gets.
      const entry = this._pendingCancels.shift();
      err.run_id = entry.runId;
      this._settle(entry, err);
      return;
    }
    if ((frame.code === "invalid_token" || frame.code === "rate_limited") && this._refreshing) {
      this._refreshing = false;
      this._emit("error", err);
      this._scheduleRefresh(this._o.refreshRetryMs);
      return;
    }
    this._emit("error", err);
  }

  // ------------------------------------------------------------------ token refresh

  /** Refresh at refreshFraction of the remaining life, at least refreshLeadMs before exp. */
  _scheduleRefresh(retryMs) {
    this._clearTimer("refresh");
    if (this._o.refresh === false || typeof this._o.token !== "function" || !this._tokenExp) return;
    if (this._status !== Status.OPEN) return;
    const left = this._tokenExp * 1000 - now();
    let delay = Math.max(0, Math.min(left * this._o.refreshFraction, left - this._o.refreshLeadMs));
    if (retryMs !== undefined) delay = Math.max(0, Math.min(retryMs, left - 1000));
    // setTimeout holds at most ~24.8 days; a later expiry is re-checked then.
    const capped = Math.min(delay, 2 ** 31 - 1);
    this._timers.refresh = setTimeout(() => {
      this._timers.refresh = null;
      if (capped < delay) this._scheduleRefresh();
      else this._refresh();
    }, capped);
  }

  async _refresh() {
    const gen = this._generation;
    const source = this._o.token;
    if (typeof source !== "function") return;
    let token;
    try {
      token = await source();
      if (typeof token !== "string" || !token) throw new Error("the token function returned no string");
    } catch (err) {
      if (gen !== this._generation) return;
      this._emit("error", new AgentwireError("token", `token refresh: ${err && err.message ? err.message : err}`));
      this._scheduleRefresh(this._o.refreshRetryMs);
      return;
    }
    if (gen !== this._generation || this._status !== Status.OPEN || !this._ws) return;
    if (this._write({ type: "refresh", token })) {
      this._refreshing = true;
      this._pendingToken = token;
    }
  }

  _onRefreshed(frame) {
    this._refreshing = false;
    if (this._pendingToken) this._token = this._pendingToken;
    this._pendingToken = null;
    this._tokenExp = typeof frame.exp === "number" ? frame.exp : tokenExpiry(this._token);
    this._stats.refreshes += 1;
    this._emit("refreshed", { exp: this._tokenExp });
    this._scheduleRefresh();
  }

  // ------------------------------------------------------------------ liveness

  /**
   * Browsers never show WebSocket pings to scripts, so a half-open connection (a laptop
   * that slept, a NAT that forgot) is found with the application `ping`: after a
   * heartbeat interval of silence the client sends one; after another interval of
   * silence it drops the socket and reconnects (resuming).
   */
  _scheduleLiveness(intervalMs) {
    const interval = typeof intervalMs === "number" && intervalMs > 0 ? intervalMs : 30000;
    this._clearTimer("liveness");
    const check = () => {
      this._timers.liveness = null;
      if (this._stopped || this._status !== Status.OPEN || !this._ws) return;
      const silent = now() - this._lastReceived;
      if (silent >= 2 * interval) {
        this._dropSocket(CLIENT_DROP, "no traffic from the gateway", true);
        this._afterClose({ code: CLIENT_DROP, reason: "no traffic from the gateway" }, false);
        return;
      }
      if (silent >= interval) this._write({ type: "ping" });
      this._timers.liveness = setTimeout(check, interval);
    };
    this._timers.liveness = setTimeout(check, interval);
  }
}

export default AgentwireClient;
