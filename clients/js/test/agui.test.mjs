// The AG-UI encoding (PROTOCOL.md section 11) against the real gateway binary, checked
// with AG-UI's own code: every frame must validate against `@ag-ui/core`'s zod schemas
// (`EventSchema` from `@ag-ui/core/schemas`, 1.0.0) and each run's frames, split by
// `runId`, must pass `@ag-ui/client`'s `verifyEvents` (1.0.0). Runs: the demo agent's,
// tool-heavy and interleaved runs published over HTTP, an error run, a cancelled run, a
// run joined mid-way, and resumes (a raw socket, and this client across a dropped one).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { AgentwireClient } from "../agentwire.js";
import { Gateway, WebSocket, waitFor, uniqueUser, runEvents, killSocket } from "../test-support/gateway.js";
import { connectAgui, closeSocket, aguiFrames, ended, typesOf, validate, verifyRuns } from "../test-support/agui.js";

const gw = new Gateway();
before(() => gw.start());
after(() => gw.stop());

const connect = (user, query = "") => connectAgui(gw, user, query);

test("the demo agent's runs: every frame valid, each run verified", { timeout: 30000 }, async () => {
  const user = uniqueUser("agui-demo");
  const ws = await connect(user);
  try {
    const runIds = [];
    for (const [i, text] of ["What is agentwire?", "And AG-UI?"].entries()) {
      ws.send(JSON.stringify({ type: "user_message", thread_id: "t1", text, ref: `m${i}` }));
      const ack = await waitFor(() => ws.frames.find((f) => f.type === "ack" && f.ref === `m${i}`), "ack");
      runIds.push(ack.run_id);
      await waitFor(() => ended(ws.frames, ack.run_id), "the run's end", 20000);
    }
    const frames = aguiFrames(ws.frames);
    validate(frames);
    await verifyRuns(frames);
    for (const runId of runIds) {
      const types = typesOf(frames, runId);
      assert.equal(types[0], "RUN_STARTED");
      assert.equal(types.at(-1), "RUN_FINISHED");
      for (const t of ["REASONING_START", "REASONING_MESSAGE_CONTENT", "TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END", "TOOL_CALL_RESULT", "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END"]) {
        assert.ok(types.includes(t), `${t} in ${types.join(" ")}`);
      }
      const started = frames.find((f) => f.runId === runId && f.type === "RUN_STARTED");
      assert.equal(started.threadId, "t1");
      const call = frames.find((f) => f.runId === runId && f.type === "TOOL_CALL_START");
      const result = frames.find((f) => f.runId === runId && f.type === "TOOL_CALL_RESULT");
      assert.equal(call.toolCallName, "web_search");
      assert.equal(result.toolCallId, call.toolCallId, "the result answers the call");
      const text = frames.filter((f) => f.runId === runId && f.type === "TEXT_MESSAGE_CONTENT").map((f) => f.delta).join("");
      assert.match(text, /three sources agree/);
    }
  } finally {
    await closeSocket(ws);
  }
});

test("tool-heavy interleaved runs over HTTP publish: valid, and split by runId each verifies", { timeout: 20000 }, async () => {
  const user = uniqueUser("agui-tools");
  const ws = await connect(user);
  try {
    const toolRun = (run, thread) =>
      [
          ["agent_started", { message: "go" }],
          ["agent_thinking", { step: 1, thought: "plan" }],
          ["tool_executing", { tool: "sql", args: { q: "select 1" }, tool_call_id: `${run}-c1` }],
          ["tool_executing", { tool: "http", args: { url: "https://example.com" } }],
          ["text_delta", { delta: "partial " }],
          ["tool_executing", { tool: "calc" }],
          ["tool_completed", { tool: "http", result: "<html>" }],
          ["tool_completed", { tool: "sql", result: [{ one: 1 }], tool_call_id: `${run}-c1` }],
          ["progress", { pct: 50 }],
          ["tool_completed", { tool: "calc", result: { value: 2 } }],
          ["text_delta", { delta: "answer" }],
          ["text_delta", { delta: "." }],
          ["agent_completed", { answer: "partial answer." }],
      ].map(([type, data]) => ({ type, user_id: user, thread_id: thread, run_id: run, agent_name: "tools_agent", data }));
    const a = toolRun("r-tools-a", "t-a");
    const b = toolRun("r-tools-b", null);
    const mixed = a.flatMap((e, i) => [e, b[i]]);
    await gw.publish(mixed);
    await waitFor(() => ended(ws.frames, "r-tools-a") && ended(ws.frames, "r-tools-b"), "both ends");
    const frames = aguiFrames(ws.frames);
    validate(frames);
    const runs = await verifyRuns(frames);
    assert.deepEqual([...runs.keys()].sort(), ["r-tools-a", "r-tools-b"]);
    const a3 = runs.get("r-tools-a");
    const calls = a3.filter((f) => f.type === "TOOL_CALL_START").map((f) => [f.toolCallName, f.toolCallId]);
    assert.deepEqual(calls, [["sql", "r-tools-a-c1"], ["http", "r-tools-a:tool:1"], ["calc", "r-tools-a:tool:2"]]);
    const results = a3.filter((f) => f.type === "TOOL_CALL_RESULT").map((f) => [f.toolCallId, f.content]);
    assert.deepEqual(results, [["r-tools-a:tool:1", "<html>"], ["r-tools-a-c1", '[{"one":1}]'], ["r-tools-a:tool:2", '{"value":2}']]);
    assert.equal(a3.filter((f) => f.type === "TEXT_MESSAGE_START").length, 2, "a text message per streak of deltas");
    assert.deepEqual(a3.find((f) => f.type === "CUSTOM"), { ...a3.find((f) => f.type === "CUSTOM"), name: "progress", value: { pct: 50 } });
    // A run with a null thread is its own thread.
    assert.equal(runs.get("r-tools-b")[0].threadId, "r-tools-b");
  } finally {
    await closeSocket(ws);
  }
});

test("an error run and a cancelled run end with RUN_ERROR carrying runId and threadId", { timeout: 20000 }, async () => {
  const user = uniqueUser("agui-err");
  const ws = await connect(user);
  try {
    await gw.publish(
      runEvents(user, "r-err", ["agent_started", "text_delta", "agent_error"], {
        thread: "t-err",
        data: (t) => (t === "agent_error" ? { error: "the model refused", code: "refused" } : t === "text_delta" ? { delta: "hm" } : {}),
      }),
    );
    await waitFor(() => ended(ws.frames, "r-err"), "the error run's end");
    // The demo agent's run, cancelled by the user: it ends with agent_error {reason: cancelled}.
    ws.send(JSON.stringify({ type: "user_message", thread_id: "t-c", text: "cancel me", ref: "c1" }));
    const ack = await waitFor(() => ws.frames.find((f) => f.type === "ack" && f.ref === "c1"), "ack");
    await waitFor(() => ws.frames.some((f) => f.runId === ack.run_id), "the run's first frame");
    ws.send(JSON.stringify({ type: "cancel", run_id: ack.run_id }));
    await waitFor(() => ended(ws.frames, ack.run_id), "the cancelled run's end", 15000);
    const frames = aguiFrames(ws.frames);
    validate(frames);
    await verifyRuns(frames);
    assert.deepEqual(typesOf(frames, "r-err"), ["RUN_STARTED", "TEXT_MESSAGE_START", "TEXT_MESSAGE_CONTENT", "TEXT_MESSAGE_END", "RUN_ERROR"]);
    const err = frames.find((f) => f.runId === "r-err" && f.type === "RUN_ERROR");
    assert.equal(err.threadId, "t-err");
    assert.equal(err.message, "the model refused");
    assert.equal(err.code, "refused");
    const cancelled = frames.find((f) => f.runId === ack.run_id && f.type === "RUN_ERROR");
    assert.ok(cancelled, `the cancelled run: ${typesOf(frames, ack.run_id).join(" ")}`);
    assert.equal(cancelled.code, "cancelled");
    assert.equal(cancelled.threadId, "t-c");
  } finally {
    await closeSocket(ws);
  }
});

test("a connection that joins mid-run gets a stream valid from its start", { timeout: 20000 }, async () => {
  const user = uniqueUser("agui-join");
  const thread = "t-join";
  const events = runEvents(user, "r-join", ["agent_started", "agent_thinking", "tool_executing", "text_delta", "text_delta", "tool_completed", "text_delta", "agent_completed"], {
    thread,
    data: (t, i) => (t === "text_delta" ? { delta: `d${i} ` } : t === "tool_executing" ? { tool: "x", args: { i } } : { i }),
  });
  await gw.publish(events.slice(0, 5)); // inside the text message
  const ws = await connect(user);
  try {
    assert.equal(ws.connected.active_runs[0].run_id, "r-join");
    await gw.publish(events.slice(5));
    await waitFor(() => ended(ws.frames, "r-join"), "the run's end");
    const frames = aguiFrames(ws.frames);
    validate(frames);
    await verifyRuns(frames);
    assert.deepEqual(typesOf(frames, "r-join"), [
      "RUN_STARTED", // the opening frames: the run, and its open text message
      "TEXT_MESSAGE_START",
      "TEXT_MESSAGE_END", // tool_completed closes the message, then its result
      "TOOL_CALL_RESULT",
      "TEXT_MESSAGE_START",
      "TEXT_MESSAGE_CONTENT",
      "TEXT_MESSAGE_END",
      "RUN_FINISHED",
    ]);
    // The opening frames stand for the events before the connection.
    assert.ok(frames[0].metadata.seq <= ws.connected.last_seq && frames[1].metadata.seq <= ws.connected.last_seq);
    assert.equal(frames[0].threadId, thread);
  } finally {
    await closeSocket(ws);
  }
});

test("a resume: the resumed stream alone is valid, and with what the client had it continues exactly", { timeout: 20000 }, async () => {
  const user = uniqueUser("agui-resume");
  const events = runEvents(user, "r-res", ["agent_started", "tool_executing", "text_delta", "text_delta", "tool_completed", "text_delta", "agent_completed"], {
    data: (t, i) => (t === "text_delta" ? { delta: `w${i} ` } : t === "tool_executing" ? { tool: "search", args: { q: i } } : { i }),
  });
  const first = await connect(user);
  const stays = await connect(user);
  await gw.publish(events.slice(0, 3));
  await waitFor(() => first.frames.filter((f) => f.type === "TEXT_MESSAGE_CONTENT").length === 1, "the first delta");
  const had = aguiFrames(first.frames);
  const lastSeq = had.at(-1).metadata.seq;
  await closeSocket(first);
  await gw.publish(events.slice(3));
  await waitFor(() => ended(stays.frames, "r-res"), "the reference run's end");
  const back = await connect(user, `&last_seq=${lastSeq}&epoch=${first.connected.epoch}`);
  try {
    assert.equal(back.connected.resumed, true);
    await waitFor(() => ended(back.frames, "r-res"), "the resumed run's end");
    const resumed = aguiFrames(back.frames);
    validate(resumed);
    await verifyRuns(resumed); // alone, from its start
    const joined = had.concat(resumed.filter((f) => f.metadata.seq > lastSeq));
    await verifyRuns(joined); // continued, deduplicated by seq
    assert.deepEqual(joined, aguiFrames(stays.frames), "exactly what a connection that stayed received");
  } finally {
    await closeSocket(back);
    await closeSocket(stays);
  }
});

test("a drop that cut an event's frames: resuming from the event before it and skipping what was had continues exactly", { timeout: 20000 }, async () => {
  const user = uniqueUser("agui-cut");
  const events = runEvents(user, "r-cut", ["agent_started", "text_delta", "tool_executing", "tool_completed", "text_delta", "agent_completed"], {
    thread: "t",
    data: (t, i) => (t === "text_delta" ? { delta: `w${i}` } : t === "tool_executing" ? { tool: "search", args: { q: i } } : { i }),
  });
  const first = await connect(user);
  const stays = await connect(user);
  await gw.publish(events.slice(0, 3));
  await waitFor(() => first.frames.some((f) => f.type === "TOOL_CALL_END"), "the tool call's frames");
  // The drop cut tool_executing's frames after TOOL_CALL_START (the text message's end
  // and the start arrived; the arguments and the end did not).
  const all = aguiFrames(first.frames);
  const cutAt = all.findIndex((f) => f.type === "TOOL_CALL_START") + 1;
  const had = all.slice(0, cutAt);
  const lastSeq = had.at(-1).metadata.seq;
  const n = had.filter((f) => f.metadata.seq === lastSeq).length;
  assert.equal(n, 2, "TEXT_MESSAGE_END and TOOL_CALL_START of that event");
  await closeSocket(first);
  await gw.publish(events.slice(3));
  await waitFor(() => ended(stays.frames, "r-cut"), "the reference run's end");
  const back = await connect(user, `&last_seq=${lastSeq - 1}&epoch=${first.connected.epoch}`);
  try {
    assert.equal(back.connected.resumed, true);
    await waitFor(() => ended(back.frames, "r-cut"), "the resumed run's end");
    let skip = n;
    const rest = aguiFrames(back.frames).filter((f) => {
      if (f.metadata.seq < lastSeq) return false;
      if (f.metadata.seq === lastSeq && skip > 0) {
        skip -= 1;
        return false;
      }
      return true;
    });
    const joined = had.concat(rest);
    await verifyRuns(joined);
    assert.deepEqual(joined, aguiFrames(stays.frames), "exactly what a connection that stayed received");
  } finally {
    await closeSocket(back);
    await closeSocket(stays);
  }
});

test("AgentwireClient with encoding agui across a dropped socket: each run's frames verify", { timeout: 30000 }, async () => {
  const user = uniqueUser("agui-client");
  const c = new AgentwireClient({ url: gw.wsUrl, token: async () => gw.token(user), WebSocket, encoding: "agui" });
  const got = [];
  c.on("event", (f) => got.push(f));
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    const runs = ["r-c1", "r-c2"];
    const types = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", ...Array(30).fill("text_delta"), "agent_completed"];
    const evs = runs.map((r) =>
      runEvents(user, r, types, { thread: "t", data: (t, i) => (t === "text_delta" ? { delta: `${i} ` } : t === "tool_executing" ? { tool: "t", args: {} } : { i }) }),
    );
    const mixed = evs[0].flatMap((e, i) => [e, evs[1][i]]);
    for (let b = 0; b < mixed.length; b += 10) {
      await gw.publish(mixed.slice(b, b + 10));
      if (b === 20 || b === 40) {
        await waitFor(() => c.socket && c.socket._socket && c.status === "open", "an open socket to drop");
        killSocket(c);
      }
    }
    await waitFor(() => runs.every((r) => ended(got, r)), "both runs' ends", 20000, () => `${got.length} frames`);
    assert.ok(c.stats.reconnects >= 1, "reconnected");
    validate(got);
    await verifyRuns(got);
    for (const r of runs) {
      const text = got.filter((f) => f.runId === r && f.type === "TEXT_MESSAGE_CONTENT").map((f) => f.delta).join("");
      assert.equal(text, Array.from({ length: 30 }, (_, i) => `${i + 4} `).join(""), `run ${r}: every delta once, in order`);
    }
  } finally {
    c.close();
  }
});
