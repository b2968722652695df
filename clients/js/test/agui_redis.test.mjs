// The AG-UI encoding (PROTOCOL.md section 11) under the Redis engine (section 9), against
// the real gateway binary: two nodes (`--engine redis`) on a real `redis-server` started
// by this test (Debian's package; tools/test.sh installs it). Every frame must validate
// against `@ag-ui/core`'s zod `EventSchema` and each run's frames, split by `runId`, must
// pass `@ag-ui/client`'s `verifyEvents` (1.0.0), with the runs going through another node
// than the connection's: the demo agent's run, tool-heavy interleaved runs, a run joined
// mid-way on another node and a resume on another node.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import net from "node:net";
import { Gateway, WebSocket, waitFor, uniqueUser, runEvents } from "../test-support/gateway.js";
import { connectAgui, closeSocket, aguiFrames, ended, typesOf, validate, verifyRuns } from "../test-support/agui.js";

let redis = null;
let redisPort = 0;
const nodes = [];

function redisAnswers(port) {
  return new Promise((resolve) => {
    const s = net.connect(port, "127.0.0.1");
    s.setTimeout(500);
    s.on("connect", () => s.write("PING\r\n"));
    s.on("data", (d) => {
      s.destroy();
      resolve(String(d).startsWith("+PONG"));
    });
    s.on("error", () => resolve(false));
    s.on("timeout", () => {
      s.destroy();
      resolve(false);
    });
  });
}

before(async () => {
  redisPort = 30000 + Math.floor(Math.random() * 10000);
  redis = spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"], {
    stdio: "ignore",
  });
  let up = false;
  for (let i = 0; i < 200 && !up; i++) {
    up = await redisAnswers(redisPort);
    if (!up) await new Promise((r) => setTimeout(r, 25));
  }
  assert.ok(up, `redis-server did not answer on ${redisPort} (tools/test.sh installs it with apt)`);
  for (const id of ["n0", "n1"]) {
    const gw = new Gateway(["--engine", "redis", "--redis-url", `redis://127.0.0.1:${redisPort}`, "--node-id", id]);
    if (nodes.length > 0) {
      // One cluster: the same keys on every node.
      gw.secret = nodes[0].secret;
      gw.publishKey = nodes[0].publishKey;
    }
    await gw.start();
    nodes.push(gw);
  }
});

after(async () => {
  for (const gw of nodes) await gw.stop();
  if (redis) {
    const gone = new Promise((r) => redis.once("exit", r));
    redis.kill("SIGKILL");
    await gone;
  }
});

const connect = connectAgui;

test("redis: the demo agent's run on one node, seen on both: valid and verified", { timeout: 30000 }, async () => {
  const user = uniqueUser("agui-r-demo");
  const a = await connect(nodes[0], user);
  const b = await connect(nodes[1], user);
  try {
    assert.equal(a.connected.node_id, "n0");
    assert.equal(b.connected.node_id, "n1");
    b.send(JSON.stringify({ type: "user_message", thread_id: "t1", text: "What is agentwire?", ref: "m1" }));
    const ack = await waitFor(() => b.frames.find((f) => f.type === "ack" && f.ref === "m1"), "ack");
    await waitFor(() => ended(a.frames, ack.run_id) && ended(b.frames, ack.run_id), "the run's end on both nodes", 20000);
    for (const ws of [a, b]) {
      const frames = aguiFrames(ws.frames);
      validate(frames);
      await verifyRuns(frames);
      const types = typesOf(frames, ack.run_id);
      assert.equal(types[0], "RUN_STARTED");
      assert.equal(types.at(-1), "RUN_FINISHED");
      for (const t of ["REASONING_START", "TOOL_CALL_START", "TOOL_CALL_RESULT", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END"]) {
        assert.ok(types.includes(t), `${t} in ${types.join(" ")}`);
      }
    }
    assert.deepEqual(aguiFrames(a.frames), aguiFrames(b.frames), "the same frames on both nodes");
  } finally {
    await closeSocket(a);
    await closeSocket(b);
  }
});

test("redis: tool-heavy interleaved runs published through the other node verify per run", { timeout: 20000 }, async () => {
  const user = uniqueUser("agui-r-tools");
  const ws = await connect(nodes[1], user);
  try {
    const toolRun = (run, thread) =>
      [
        ["agent_started", { message: "go" }],
        ["agent_thinking", { step: 1, thought: "plan" }],
        ["tool_executing", { tool: "sql", args: { q: "select 1" }, tool_call_id: `${run}-c1` }],
        ["tool_executing", { tool: "http", args: { url: "https://example.com" } }],
        ["text_delta", { delta: "partial " }],
        ["tool_completed", { tool: "http", result: "<html>" }],
        ["tool_completed", { tool: "sql", result: [{ one: 1 }], tool_call_id: `${run}-c1` }],
        ["progress", { pct: 50 }],
        ["text_delta", { delta: "answer" }],
        ["agent_completed", { answer: "partial answer." }],
      ].map(([type, data]) => ({ type, user_id: user, thread_id: thread, run_id: run, agent_name: "tools_agent", data }));
    const a = toolRun("r-a", "t-a");
    const b = toolRun("r-b", null);
    await nodes[0].publish(a.flatMap((e, i) => [e, b[i]]));
    await waitFor(() => ended(ws.frames, "r-a") && ended(ws.frames, "r-b"), "both ends");
    const frames = aguiFrames(ws.frames);
    validate(frames);
    const runs = await verifyRuns(frames);
    const calls = runs.get("r-a").filter((f) => f.type === "TOOL_CALL_START").map((f) => f.toolCallId);
    assert.deepEqual(calls, ["r-a-c1", "r-a:tool:1"]);
    assert.equal(runs.get("r-b")[0].threadId, "r-b");
  } finally {
    await closeSocket(ws);
  }
});

test("redis: a connection that joins mid-run on another node gets a stream valid from its start", { timeout: 20000 }, async () => {
  const user = uniqueUser("agui-r-join");
  const events = runEvents(user, "r-join", ["agent_started", "agent_thinking", "tool_executing", "text_delta", "text_delta", "tool_completed", "text_delta", "agent_completed"], {
    thread: "t-join",
    data: (t, i) => (t === "text_delta" ? { delta: `d${i} ` } : t === "tool_executing" ? { tool: "x", args: { i } } : { i }),
  });
  await nodes[0].publish(events.slice(0, 5)); // inside the text message
  const ws = await connect(nodes[1], user);
  try {
    assert.equal(ws.connected.active_runs[0].run_id, "r-join");
    await nodes[0].publish(events.slice(5));
    await waitFor(() => ended(ws.frames, "r-join"), "the run's end");
    const frames = aguiFrames(ws.frames);
    validate(frames);
    await verifyRuns(frames);
    assert.deepEqual(typesOf(frames, "r-join"), [
      "RUN_STARTED",
      "TEXT_MESSAGE_START",
      "TEXT_MESSAGE_END",
      "TOOL_CALL_RESULT",
      "TEXT_MESSAGE_START",
      "TEXT_MESSAGE_CONTENT",
      "TEXT_MESSAGE_END",
      "RUN_FINISHED",
    ]);
    assert.ok(frames[0].metadata.seq <= ws.connected.last_seq && frames[1].metadata.seq <= ws.connected.last_seq);
    // The result answers the call made before the connection (paired by order).
    assert.equal(frames[3].toolCallId, "r-join:tool:1");
  } finally {
    await closeSocket(ws);
  }
});

test("redis: a resume on another node, alone valid, with what the client had continues exactly", { timeout: 20000 }, async () => {
  const user = uniqueUser("agui-r-resume");
  const events = runEvents(user, "r-res", ["agent_started", "tool_executing", "text_delta", "text_delta", "tool_completed", "text_delta", "agent_completed"], {
    data: (t, i) => (t === "text_delta" ? { delta: `w${i} ` } : t === "tool_executing" ? { tool: "search", args: { q: i } } : { i }),
  });
  const first = await connect(nodes[0], user);
  const stays = await connect(nodes[0], user);
  await nodes[1].publish(events.slice(0, 3));
  await waitFor(() => first.frames.filter((f) => f.type === "TEXT_MESSAGE_CONTENT").length === 1, "the first delta");
  const had = aguiFrames(first.frames);
  const lastSeq = had.at(-1).metadata.seq;
  await closeSocket(first);
  await nodes[1].publish(events.slice(3));
  await waitFor(() => ended(stays.frames, "r-res"), "the reference run's end");
  const back = await connect(nodes[1], user, `&last_seq=${lastSeq}&epoch=${first.connected.epoch}`);
  try {
    assert.equal(back.connected.resumed, true);
    assert.equal(back.connected.node_id, "n1");
    await waitFor(() => ended(back.frames, "r-res"), "the resumed run's end");
    const resumed = aguiFrames(back.frames);
    validate(resumed);
    await verifyRuns(resumed); // alone, from its start
    const joined = had.concat(resumed.filter((f) => f.metadata.seq > lastSeq));
    await verifyRuns(joined);
    assert.deepEqual(joined, aguiFrames(stays.frames), "exactly what a connection that stayed received");
  } finally {
    await closeSocket(back);
    await closeSocket(stays);
  }
});
