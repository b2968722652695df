// Reconnect and resume against the real gateway: no event shown twice and no hole across
// forced disconnects, a slow-consumer close (1013), a reconnect in the middle of a run
// (RunState continues), and `reset` when the gateway cannot resume (replay window
// overflowed, gateway restarted with a new epoch).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { AgentwireClient } from "../agentwire.js";
import {
  Gateway,
  WebSocket,
  waitFor,
  uniqueUser,
  record,
  runEvents,
  killSocket,
} from "../test-support/gateway.js";

const gw = new Gateway();
before(() => gw.start());
after(() => gw.stop());

function client(g, user, extra = {}) {
  return new AgentwireClient({ url: g.wsUrl, token: async () => g.token(user), WebSocket, ...extra });
}

const range = (a, b) => Array.from({ length: b - a + 1 }, (_, i) => a + i);

test("forced disconnects: every event exactly once, in order, resumed:true", { timeout: 20000 }, async () => {
  const user = uniqueUser("dedupe");
  const c = client(gw, user);
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    const run = "r-dedupe";
    const types = ["agent_started", ...Array(198).fill("step"), "agent_completed"];
    const events = runEvents(user, run, types);
    // Publish in 10 batches; drop the TCP connection (no close handshake) after three
    // of them, while the next batches are published.
    for (let b = 0; b < 10; b++) {
      await gw.publish(events.slice(b * 20, b * 20 + 20));
      if (b === 2 || b === 5 || b === 7) {
        await waitFor(() => c.socket && c.socket._socket && c.status === "open", "an open socket to kill");
        killSocket(c);
      }
    }
    await waitFor(() => rec.seqs.length >= 200, "all 200 events", 15000, () => `got ${rec.seqs.length}`);
    assert.deepEqual(rec.seqs, range(1, 200), "every seq once, in order, no hole");
    assert.equal(rec.events.at(-1).type, "agent_completed");
    assert.ok(rec.connected.length >= 2, "reconnected");
    for (const f of rec.connected.slice(1)) assert.equal(f.resumed, true, "every reconnect resumed exactly");
    assert.equal(rec.resets.length, 0);
    assert.ok(rec.statuses.includes("reconnecting"));
    assert.equal(c.runs.get(run).status, "completed");
    assert.equal(c.runs.get(run).events.length, 200);
    assert.ok(rec.closes.includes(1006), `abnormal closes seen: ${rec.closes}`);
  } finally {
    c.close();
  }
});

test("a reconnect in the middle of a run: the RunState continues from the replay", { timeout: 15000 }, async () => {
  const user = uniqueUser("midrun");
  const c = client(gw, user, { threadId: "t9" });
  const rec = record(c);
  const run = "r-midrun";
  const ev = (type, data) => ({ type, user_id: user, thread_id: "t9", run_id: run, agent_name: "a1", data });
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    await gw.publish([
      ev("agent_started", { message: "hi" }),
      ev("agent_thinking", { thought: "one" }),
      ev("agent_thinking", { thought: "two" }),
      ev("tool_executing", { tool: "sql", args: { q: "select 1" } }),
    ]);
    await waitFor(() => c.runs.get(run)?.tools.length === 1, "tool started");
    assert.equal(c.runs.get(run).tools[0].status, "running");
    killSocket(c);
    await gw.publish([
      ev("tool_completed", { tool: "sql", result: [[1]] }),
      ev("text_delta", { delta: "The answer " }),
      ev("text_delta", { delta: "is 1." }),
      ev("agent_completed", { answer: "The answer is 1." }),
    ]);
    await waitFor(() => c.runs.get(run)?.status === "completed", "run completed after the resume", 12000);
    const r = c.runs.get(run);
    assert.deepEqual(r.thinking, ["one", "two"]);
    assert.deepEqual(r.tools.map(({ name, args, result, status }) => ({ name, args, result, status })), [
      { name: "sql", args: { q: "select 1" }, result: [[1]], status: "completed" },
    ]);
    assert.equal(r.text, "The answer is 1.");
    assert.equal(r.partial, false);
    assert.deepEqual(r.events.map((e) => e.seq), range(1, 8));
    assert.equal(rec.connected.at(-1).resumed, true);
    assert.equal(rec.resets.length, 0);
  } finally {
    c.close();
  }
});

test("slow consumer closed with 1013 resumes with nothing lost or repeated", { timeout: 20000 }, async () => {
  const slow = new Gateway(["--max-pending-bytes", "65536", "--socket-send-buffer-bytes", "4096"]);
  await slow.start();
  const user = uniqueUser("slow");
  const c = client(slow, user);
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    // Stop reading: the gateway's output for this connection piles up past 64 KiB.
    const tcp = c.socket._socket;
    tcp.pause();
    const pad = "x".repeat(2000);
    const types = ["agent_started", ...Array(598).fill("chunk"), "agent_completed"];
    const events = runEvents(user, "r-slow", types, { data: (t, i) => ({ i, pad }) });
    for (let b = 0; b < 600; b += 100) await slow.publish(events.slice(b, b + 100));
    const deadline = Date.now() + 10000;
    for (;;) {
      const st = await slow.stats();
      if (st.connections.closed_by_reason?.slow_consumer >= 1) break;
      if (Date.now() > deadline) throw new Error(`no slow-consumer close: ${JSON.stringify(st.connections)}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    tcp.resume();
    await waitFor(() => rec.seqs.length >= 600, "all 600 events", 15000, () => `got ${rec.seqs.length}`);
    assert.deepEqual(rec.seqs, range(1, 600));
    assert.ok(rec.connected.length >= 2, "reconnected");
    assert.equal(rec.connected.at(-1).resumed, true);
    assert.equal(rec.resets.length, 0);
    assert.equal(c.runs.get("r-slow").status, "completed");
  } finally {
    c.close();
    await slow.stop();
  }
});

test("replay window overflowed while away: reset, then runs rebuilt from active_runs", { timeout: 20000 }, async () => {
  const small = new Gateway(["--replay-events", "8"]);
  await small.start();
  const user = uniqueUser("overflow");
  const c = client(small, user);
  const rec = record(c);
  const raws = [];
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    await small.publish(runEvents(user, "r-old", ["agent_started", "agent_completed"]));
    await waitFor(() => c.runs.get("r-old")?.status === "completed", "first run");
    // Three newer connections of the user evict the client (4002): it stays away.
    for (let i = 0; i < 3; i++) raws.push(await small.rawConnect(user));
    await waitFor(() => c.status === "evicted", "evicted");
    for (const ws of raws) ws.close();
    // 20 events while away: more than the 8 the gateway keeps.
    await small.publish(runEvents(user, "r-new", ["agent_started", ...Array(19).fill("step")]));
    const seenBefore = rec.seqs.length;
    c.connect();
    await waitFor(() => rec.resets.length === 1, "reset", 8000);
    await waitFor(() => c.status === "open", "open again");
    assert.equal(rec.connected.at(-1).resumed, false);
    // The reset cleared the old runs; the run in progress came back from active_runs.
    assert.equal(c.runs.has("r-old"), false);
    const r = c.runs.get("r-new");
    assert.ok(r, "the active run is rebuilt");
    assert.equal(r.status, "running");
    assert.equal(r.partial, true);
    assert.equal(rec.seqs.length, seenBefore, "nothing replayed after a reset");
    await small.publish(runEvents(user, "r-new", ["agent_completed"]));
    await waitFor(() => c.runs.get("r-new").status === "completed", "the run's end after the reset");
    assert.equal(rec.seqs.at(-1), 23);
    assert.equal(new Set(rec.seqs).size, rec.seqs.length, "no event twice");
  } finally {
    c.close();
    for (const ws of raws) ws.terminate();
    await small.stop();
  }
});

test("gateway restarted (new epoch): reset, old runs cleared, new events delivered", { timeout: 20000 }, async () => {
  const g = new Gateway();
  await g.start();
  const user = uniqueUser("restart");
  const c = client(g, user, { backoffMaxMs: 2000 });
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    await g.publish(runEvents(user, "r-before", ["agent_started", "agent_thinking"]));
    await waitFor(() => c.runs.has("r-before"), "run before the restart");
    const epoch = c.epoch;
    await g.restart();
    await waitFor(() => rec.resets.length === 1 && c.status === "open", "reset after the restart", 15000);
    assert.notEqual(c.epoch, epoch);
    assert.equal(rec.connected.at(-1).resumed, false);
    assert.equal(c.runs.size, 0, "runs of the old epoch cleared (the new gateway has none active)");
    assert.equal(c.lastSeq, 0);
    await g.publish(runEvents(user, "r-after", ["agent_started", "agent_completed"]));
    await waitFor(() => c.runs.get("r-after")?.status === "completed", "run after the restart");
    // The old gateway ended the open run on shutdown (agent_error "shutdown", seq 3)
    // before it closed; the new epoch counts from 1 again.
    assert.deepEqual(rec.events[2].data, { reason: "shutdown" });
    assert.deepEqual(rec.seqs, [1, 2, 3, 1, 2], "seqs restart with the epoch, each event once");
  } finally {
    c.close();
    await g.stop();
  }
});

test("a silent connection (half-open) is dropped by the client's liveness check and resumed", { timeout: 25000 }, async () => {
  const g = new Gateway(["--heartbeat-interval-ms", "1000", "--heartbeat-timeout-ms", "15000"]);
  await g.start();
  const user = uniqueUser("silent");
  const c = client(g, user);
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    assert.equal(rec.connected[0].heartbeat_interval_ms, 1000);
    // Quiet but alive: the client's pings are answered, it stays on its connection.
    await new Promise((r) => setTimeout(r, 3000));
    assert.equal(rec.connected.length, 1, "three quiet intervals, still the first connection");
    // Stop reading, as a connection whose peer vanished: nothing arrives any more.
    // (1 s intervals, not shorter: on a loaded machine a pong can take longer than a
    // few hundred ms, and the client would rightly drop the connection early.)
    await waitFor(() => c.status === "open" && c.socket, "open with a socket");
    c.socket._socket.pause();
    await g.publish(runEvents(user, "r-silent", ["agent_started", "agent_completed"]));
    await waitFor(() => rec.connected.length === 2, "a new connection after two silent intervals", 10000);
    assert.equal(rec.closes[0], 4000, `closes: ${rec.closes}`);
    assert.equal(rec.connected[1].resumed, true);
    await waitFor(() => c.runs.get("r-silent")?.status === "completed", "the events sent to the silent socket, replayed");
    assert.deepEqual(rec.seqs, [1, 2]);
  } finally {
    c.close();
    await g.stop();
  }
});

test("a send whose ack is lost with the connection rejects `disconnected`; its run still shows after the resume", { timeout: 15000 }, async () => {
  const user = uniqueUser("lostack");
  const c = client(gw, user);
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    // The message is written, then the client drops that connection at once (as on a
    // network change): the ack, if the gateway writes one, goes to a dead socket.
    const sent = c.send("will the ack come?");
    c.reconnect();
    await assert.rejects(sent, (e) => e.code === "disconnected");
    // The gateway did start the demo run: the resume brings it, whole and once.
    await waitFor(() => [...c.runs.values()].some((r) => r.status === "completed"), "the demo run after the resume", 10000);
    const [run] = c.runs.values();
    assert.equal(run.partial, false);
    assert.equal(run.thinking.length, 3);
    assert.ok(rec.connected.at(-1).resumed);
    assert.deepEqual(rec.seqs, range(1, rec.seqs.length));
  } finally {
    c.close();
  }
});
