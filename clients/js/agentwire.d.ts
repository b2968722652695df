// Types of agentwire.js, the browser and Node client of the agentwire gateway
// (PROTOCOL.md section 10.1). See README.md in this folder.

/** Connection status: `status` events and the `status` getter. */
export type ConnectionStatus = "connecting" | "open" | "reconnecting" | "evicted" | "closed";

/** A run's outcome so far. */
export type RunStatus = "running" | "completed" | "error" | "cancelled";

/** A token, or a function giving one (called on every connection attempt and refresh). */
export type TokenSource = string | (() => string | Promise<string>);

/** Minimal WebSocket constructor shape (the browser's, or `ws` on Node). */
export interface WebSocketLike {
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onerror: ((ev: any) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
}
/** Any WebSocket class: the browser's, `ws`'s, undici's (only the members above are used). */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => any;

export interface AgentwireOptions {
  /** `ws://host:port/ws` (or `wss://`); in a browser a relative `/ws` works too. */
  url: string;
  /** JWT for the user, or a (possibly async) function returning one. */
  token: TokenSource;
  /** Only this thread's events (plus events with a null thread); default thread of `send`. */
  threadId?: string | null;
  /** `main` (default), `factory`, `legacy` or `isolated`. */
  mode?: "main" | "factory" | "legacy" | "isolated";
  /**
   * `agentwire` (default) or `agui` (`encoding=agui`: AG-UI 1.0 events, see docs/AGUI.md).
   * AG-UI frames go to `event` as they are (no RunState); a resume asks again for the
   * last event seen (a drop may have cut its frames) and drops the frames already shown.
   */
  encoding?: "agentwire" | "agui";
  /** WebSocket implementation; default `globalThis.WebSocket`. Node 20: `WebSocket` from `ws`. */
  WebSocket?: WebSocketConstructor;
  /** How the token travels: `protocol` (default, `Sec-WebSocket-Protocol: agentwire.v1, bearer.<jwt>`) or `query` (`?token=`). */
  auth?: "protocol" | "query";
  /** Resume from a position kept elsewhere (e.g. sessionStorage across page loads). */
  resume?: { epoch: string; lastSeq: number };
  /** Refresh the token before it expires (default true; needs `token` to be a function). */
  refresh?: boolean;
  /** Backoff ceiling of the first retry, ms (default 1000); doubles per failed attempt. */
  backoffBaseMs?: number;
  /** Longest wait between attempts, ms (default 30000). */
  backoffMaxMs?: number;
  /** RunStates kept (default 200); the oldest ended runs are dropped first. */
  maxRuns?: number;
  /** Events kept per run, newest first (default 1000); also bounds `thinking` and `tools`. */
  maxEventsPerRun?: number;
  /** Characters of streamed text kept per run (default 1000000). */
  maxTextChars?: number;
  /** Messages (`send`, `cancel`) waiting for a connection (default 256). */
  maxQueued?: number;
  /** An unanswered `send` / `cancel` is rejected with `timeout` after this, ms (default 30000). */
  requestTimeoutMs?: number;
  /** Refresh at this fraction of the token's remaining life (default 0.8) ... */
  refreshFraction?: number;
  /** ... and at least this long before `exp`, ms (default 5000). */
  refreshLeadMs?: number;
  /** Retry a refresh refused (`rate_limited`, `invalid_token`) or failed after this, ms (default 2000). */
  refreshRetryMs?: number;
}

/** One event as the gateway sends it (PROTOCOL.md section 2). */
export interface AgentwireEvent<D = any> {
  type: string;
  seq: number;
  user_id: string;
  thread_id: string | null;
  run_id: string;
  agent_name: string;
  ts: number;
  data: D;
}

/** A tool call of a run: `tool_executing` paired with its `tool_completed`. */
export interface ToolCall {
  name: string | null;
  args: any;
  result: any;
  status: "running" | "completed" | "error";
  /** The worker's `tool_call_id` when it gave one (pairing key), else null. */
  tool_call_id: string | null;
  /** `data.error` of a failed `tool_completed`. */
  error?: any;
}

/** A run's aggregated state, kept in `client.runs` and passed to `run` listeners. */
export interface RunState {
  run_id: string;
  thread_id: string | null;
  agent_name: string | null;
  status: RunStatus;
  /** Thinking steps: `data.thought` (or `text`, `content`, `message`) of each `agent_thinking`. */
  thinking: string[];
  tools: ToolCall[];
  /** The concatenated `data.delta` of the run's `text_delta` events. */
  text: string;
  /** The run's events seen by this client (at most `maxEventsPerRun`, newest kept). */
  events: AgentwireEvent[];
  started_ts: number | null;
  ended_ts: number | null;
  /** `seq` of the run's last event seen. */
  last_seq: number;
  /** `data` of `agent_completed`. */
  result: any;
  /** `data` of `agent_error` (`{"reason": ...}` for gateway-made ones). */
  error: any;
  /** A `cancel` of this run was acknowledged. */
  cancel_requested: boolean;
  /** The run began before this client saw it (from `active_runs` or a reset): early events are missing. */
  partial: boolean;
  /** Events removed from `events` by the bound. */
  events_dropped: number;
  /** `text` reached `maxTextChars`. */
  text_truncated: boolean;
}

/** One of the user's runs in progress, as listed by the `connected` frame. */
export interface ActiveRun {
  run_id: string;
  thread_id: string | null;
  agent_name: string;
  started_ts: number;
  last_seq: number;
  last_type: string;
}

/** The gateway's first frame on every connection (PROTOCOL.md section 3). */
export interface ConnectedFrame {
  type: "connected";
  connection_id: string;
  user_id: string;
  mode: string;
  thread_id: string | null;
  epoch: string;
  last_seq: number;
  resumed: boolean | null;
  heartbeat_interval_ms: number;
  token_exp: number;
  active_runs: ActiveRun[];
  active_runs_truncated?: boolean;
  node_id?: string;
}

/** Second argument of `status` listeners: why the status changed, when known. */
export interface StatusDetail {
  /** Close code of the connection that ended (4001, 4002, 1006, ...). */
  code?: number;
  reason?: string;
  /** On `open`: the `resumed` field of the `connected` frame. */
  resumed?: boolean | null;
}

export interface ResetInfo {
  epoch: string;
  last_seq: number;
  connected: ConnectedFrame;
}

export type AgentwireErrorCode =
  | "no_agent"
  | "busy"
  | "too_large"
  | "not_found"
  | "bad_message"
  | "invalid_token"
  | "rate_limited"
  | "disconnected"
  | "closed"
  | "evicted"
  | "timeout"
  | "queue_full"
  | "token"
  | "refused"
  | (string & {});

/** Rejection of `send` / `cancel`, and the argument of `error` listeners. */
export declare class AgentwireError extends Error {
  constructor(code: AgentwireErrorCode, message: string, extra?: object);
  code: AgentwireErrorCode;
  /** The `ref` of the refused `send`. */
  ref?: string | null;
  /** The run of a refused `cancel`. */
  run_id?: string;
  /** HTTP status of a refused upgrade (Node only). */
  status?: number;
}

export interface ClientEvents {
  event: (ev: AgentwireEvent) => void;
  run: (run: RunState) => void;
  status: (status: ConnectionStatus, detail: StatusDetail | null) => void;
  reset: (info: ResetInfo) => void;
  connected: (frame: ConnectedFrame) => void;
  refreshed: (info: { exp: number }) => void;
  error: (err: AgentwireError) => void;
}

export declare const CloseCode: Readonly<{
  NORMAL: 1000;
  GOING_AWAY: 1001;
  POLICY: 1008;
  TOO_BIG: 1009;
  SLOW_CONSUMER: 1013;
  TOKEN_EXPIRED: 4001;
  EVICTED: 4002;
  OTHER_USER: 4003;
  REVOKED: 4004;
}>;

export declare const Status: Readonly<{
  CONNECTING: "connecting";
  OPEN: "open";
  RECONNECTING: "reconnecting";
  EVICTED: "evicted";
  CLOSED: "closed";
}>;

/** `exp` (seconds) of a JWT, read without verifying it; null when unreadable. */
export declare function tokenExpiry(token: string): number | null;

export declare class AgentwireClient {
  constructor(options: AgentwireOptions);
  /** run_id -> RunState, oldest first. */
  readonly runs: Map<string, RunState>;
  readonly status: ConnectionStatus;
  readonly epoch: string | null;
  readonly lastSeq: number;
  readonly connection: ConnectedFrame | null;
  readonly tokenExp: number | null;
  readonly lastClose: { code: number; reason: string } | null;
  readonly stats: { duplicates: number; reconnects: number; resets: number; refreshes: number };
  readonly socket: WebSocketLike | null;
  on<K extends keyof ClientEvents>(name: K, fn: ClientEvents[K]): () => void;
  off<K extends keyof ClientEvents>(name: K, fn: ClientEvents[K]): void;
  connect(): void;
  send(text: string, options?: { threadId?: string | null; ref?: string }): Promise<{ run_id: string; ref: string }>;
  cancel(runId: string): Promise<{ run_id: string }>;
  reconnect(): void;
  close(): void;
}

export default AgentwireClient;
