// What one Node process spends consuming and aggregating events with clients/js.
//
//   node clients/js/bench/consume.js [EVENTS] [RUNS]      (defaults 100000, 100)
//
// 1. End to end: a real gateway (AGENTWIRE_BIN, default target/release/agentwire), one
//    client; EVENTS events over RUNS runs (agent_started, thinking, tool calls, text
//    deltas, agent_completed) published in batches of 1000 by a separate process
//    (curl-free: a child Node process), timed from the first publish to the last event
//    aggregated. Reports events/s and this process's CPU time per event.
// 2. Aggregation alone: the same frames fed to the client's frame handler with no
//    socket, to separate the client's own cost from the WebSocket library's.
// Run it on an idle machine; it prints one JSON line per part.

import { spawn } from "node:child_process";
import { AgentwireClient } from "../agentwire.js";
import { Gateway, WebSocket, waitFor, uniqueUser } from "../test-support/gateway.js";

const EVENTS = Number(process.argv[2] || 100000);
const RUNS = Number(process.argv[3] || 100);

function runTypes(n) {
  const body = [];
  for (let i = 0; body.length < n - 2; i++) {
    const k = i % 10;
    body.push(k === 0 ? "agent_thinking" : k === 1 ? "tool_executing" : k === 2 ? "tool_completed" : "text_delta");
  }
  return ["agent_started", ...body, "agent_completed"];
}

function dataFor(type, i) {
  switch (type) {
    case "agent_thinking":
      return { thought: `step ${i}` };
    case "tool_executing":
      return { tool: "search", args: { q: `query ${i}` } };
    case "tool_completed":
      return { tool: "search", result: { hits: i } };
    case "text_delta":
      return { delta: "token " };
    default:
      return { i };
  }
}

function allEvents(user) {
  const perRun = Math.max(2, Math.floor(EVENTS / RUNS));
  const runs = Array.from({ length: RUNS }, (_, r) =>
    runTypes(perRun).map((type, i) => ({ type, user_id: user, thread_id: null, run_id: `r-${r}`, agent_name: "bench", data: dataFor(type, i) })),
  );
  // Interleave the runs, as concurrent agents would.
  const out = [];
  for (let i = 0; i < perRun; i++) for (const run of runs) out.push(run[i]);
  return out;
}

async function endToEnd() {
  // Enough replay and pending room that nothing is dropped while the client reads.
  const gw = new Gateway(["--max-pending-bytes", String(64 << 20), "--max-active-runs-per-user", String(RUNS + 10)]);
  await gw.start();
  const user = uniqueUser("bench");
  const events = allEvents(user);
  const c = new AgentwireClient({ url: gw.wsUrl, token: gw.token(user), WebSocket, maxRuns: RUNS + 10 });
  let got = 0;
  c.on("event", () => got++);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    const publisher = `
      const [base, key] = process.argv.slice(1);
      const events = JSON.parse(require("fs").readFileSync(0, "utf8"));
      (async () => {
        for (let i = 0; i < events.length; i += 1000) {
          const r = await fetch(base + "/api/events", { method: "POST",
            headers: { authorization: "Bearer " + key, "content-type": "application/json" },
            body: JSON.stringify(events.slice(i, i + 1000)) });
          if (r.status !== 202) { console.error(r.status, await r.text()); process.exit(1); }
        }
      })();`;
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    const child = spawn(process.execPath, ["-e", publisher, gw.base, gw.publishKey], { stdio: ["pipe", "inherit", "inherit"] });
    child.stdin.end(JSON.stringify(events));
    await waitFor(() => got >= events.length, "every event", 300000, () => `got ${got}`);
    const ms = performance.now() - t0;
    const cpu = process.cpuUsage(cpu0);
    const completed = [...c.runs.values()].filter((r) => r.status === "completed").length;
    console.log(
      JSON.stringify({
        part: "end_to_end",
        events: events.length,
        runs: RUNS,
        completed_runs: completed,
        wall_ms: Math.round(ms),
        events_per_s: Math.round((events.length / ms) * 1000),
        client_cpu_us_per_event: +(((cpu.user + cpu.system) / events.length)).toFixed(2),
      }),
    );
  } finally {
    c.close();
    await gw.stop();
  }
  return events;
}

function aggregationOnly(events) {
  const c = new AgentwireClient({ url: "ws://127.0.0.1:1/ws", token: "x", maxRuns: RUNS + 10 });
  const frames = events.map((e, i) => JSON.stringify({ ...e, seq: i + 1, ts: Date.now() }));
  // Pretend to be open, as after a `connected` frame.
  c._onFrame(JSON.stringify({ type: "connected", epoch: "e", last_seq: 0, resumed: null, active_runs: [], heartbeat_interval_ms: 30000, token_exp: 0 }));
  c._clearTimer("liveness");
  let got = 0;
  c.on("run", () => got++);
  const t0 = performance.now();
  for (const f of frames) c._onFrame(f);
  const ms = performance.now() - t0;
  console.log(
    JSON.stringify({
      part: "aggregation_only",
      events: frames.length,
      ms: Math.round(ms),
      events_per_s: Math.round((frames.length / ms) * 1000),
      us_per_event: +((ms * 1000) / frames.length).toFixed(2),
      run_updates: got,
    }),
  );
  c.close();
}

const events = await endToEnd();
aggregationOnly(events);
