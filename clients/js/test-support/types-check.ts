// Compiled (never run) by test/types.test.js with `tsc --noEmit --strict`: the README's
// usage must type-check against agentwire.d.ts, and misuse must not.
import { AgentwireClient, AgentwireError, type RunState, type ConnectionStatus, type AgentwireEvent } from "../agentwire.js";

const client = new AgentwireClient({
  url: "ws://127.0.0.1:8080/ws",
  token: async () => "jwt",
  threadId: "t1",
  mode: "main",
  encoding: "agentwire",
});
client.on("event", (ev: AgentwireEvent) => console.log(ev.seq, ev.type, ev.run_id));
client.on("run", (run: RunState) => {
  const s: "running" | "completed" | "error" | "cancelled" = run.status;
  const tools: { name: string | null; args: unknown; result: unknown; status: string }[] = run.tools;
  const text: string = run.text;
  const thinking: string[] = run.thinking;
  console.log(s, tools, text, thinking, run.events.length);
});
const off = client.on("status", (s: ConnectionStatus, detail) => console.log(s, detail?.code));
off();
client.on("reset", (info) => console.log(info.epoch, info.last_seq));
client.on("error", (e: AgentwireError) => console.log(e.code));
client.connect();
async function main(): Promise<void> {
  const { run_id } = await client.send("What is agentwire?", { threadId: "t1" });
  await client.cancel(run_id);
  const run: RunState | undefined = client.runs.get(run_id);
  const seq: number = client.lastSeq;
  const epoch: string | null = client.epoch;
  console.log(run, seq, epoch, client.status);
  client.close();
}
void main;

// The browser's WebSocket class fits the option (as do `ws` and undici's).
new AgentwireClient({ url: "/ws", token: "x", WebSocket: globalThis.WebSocket, auth: "query", resume: { epoch: "e", lastSeq: 3 } });
class MyWs {
  constructor(public url: string, public protocols?: string | string[]) {}
  onopen = null; onmessage = null; onerror = null; onclose = null;
  send(_: string) {}
  close() {}
}
new AgentwireClient({ url: "/ws", token: "x", WebSocket: MyWs });

// @ts-expect-error: an unknown event name
client.on("nonsense", () => {});
// @ts-expect-error: url is required
new AgentwireClient({ token: "x" });
// @ts-expect-error: encoding is agentwire or agui
new AgentwireClient({ url: "ws://x/ws", token: "x", encoding: "json" });
