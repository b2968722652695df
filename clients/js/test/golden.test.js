// The golden path against the real gateway and its demo agent: send() is acked with a
// run_id, the run is aggregated into a RunState (thinking, a tool call with its args and
// result, streamed text, completed), cancel() works, and send() errors carry the
// gateway's codes.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { AgentwireClient, AgentwireError } from "../agentwire.js";
import { Gateway, WebSocket, waitFor, uniqueUser, record, strictlyIncreasing } from "../test-support/gateway.js";

const gw = new Gateway();
const noAgent = new Gateway([], { demoAgent: false });
before(async () => {
  await gw.start();
  await noAgent.start();
});
after(async () => {
  await gw.stop();
  await noAgent.stop();
});

function client(g, user, extra = {}) {
  return new AgentwireClient({ url: g.wsUrl, token: async () => g.token(user), WebSocket, ...extra });
}

test("golden path: send is acked and the demo run is aggregated into a RunState", { timeout: 20000 }, async () => {
  const user = uniqueUser("golden");
  const c = client(gw, user, { threadId: "t1" });
  const rec = record(c);
  const runUpdates = [];
  c.on("run", (r) => runUpdates.push(r.status));
  try {
    c.connect();
    assert.equal(c.status, "connecting");
    // send() before the connection is open: queued, then sent.
    const { run_id, ref } = await c.send("What is agentwire?", { threadId: "t1" });
    assert.match(run_id, /^r-/);
    assert.equal(typeof ref, "string");
    assert.equal(c.status, "open");
    await waitFor(() => c.runs.get(run_id)?.status === "completed", "run completed", 15000, () => JSON.stringify(c.runs.get(run_id)));
    const run = c.runs.get(run_id);
    assert.equal(run.run_id, run_id);
    assert.equal(run.thread_id, "t1");
    assert.equal(run.agent_name, "demo_agent");
    assert.deepEqual(run.thinking, ["Reading the question", "Deciding which tool can answer it", "Planning the search"]);
    assert.equal(run.tools.length, 1);
    assert.deepEqual(run.tools[0].name, "web_search");
    assert.deepEqual(run.tools[0].args, { query: "What is agentwire?" });
    assert.deepEqual(run.tools[0].result, { hits: 3, top: "A short article about What is agentwire?" });
    assert.equal(run.tools[0].status, "completed");
    assert.equal(run.text, 'Here is what I found about "What is agentwire?": three sources agree.');
    assert.equal(run.result.answer, run.text);
    assert.equal(run.partial, false);
    const types = run.events.map((e) => e.type);
    assert.deepEqual(types.slice(0, 6), ["agent_started", "agent_thinking", "agent_thinking", "agent_thinking", "tool_executing", "tool_completed"]);
    assert.equal(types.at(-1), "agent_completed");
    assert.ok(types.slice(6, -1).every((t) => t === "text_delta"));
    assert.ok(strictlyIncreasing(rec.seqs), "seqs strictly increasing");
    assert.equal(c.lastSeq, rec.seqs.at(-1));
    assert.deepEqual(rec.events.map((e) => e.seq), run.events.map((e) => e.seq), "every event of the run went to `event` too");
    assert.equal(runUpdates[0], "running");
    assert.equal(runUpdates.at(-1), "completed");
    assert.equal(rec.resets.length, 0);
    assert.equal(rec.connected[0].resumed, null);
  } finally {
    c.close();
  }
  assert.equal(c.status, "closed");
});

test("cancel: resolves on cancel_requested and the run ends cancelled", { timeout: 15000 }, async () => {
  const user = uniqueUser("cancel");
  const c = client(gw, user);
  try {
    c.connect();
    const { run_id } = await c.send("cancel me");
    await waitFor(() => c.runs.get(run_id)?.events.length > 0, "first event");
    const answer = await c.cancel(run_id);
    assert.deepEqual(answer, { run_id });
    assert.equal(c.runs.get(run_id).cancel_requested, true);
    await waitFor(() => c.runs.get(run_id).status !== "running", "run ended", 10000);
    const run = c.runs.get(run_id);
    assert.equal(run.status, "cancelled");
    assert.deepEqual(run.error, { reason: "cancelled" });
    // A cancel of an ended run: the gateway's not_found.
    await assert.rejects(c.cancel(run_id), (e) => e instanceof AgentwireError && e.code === "not_found" && e.run_id === run_id);
  } finally {
    c.close();
  }
});

test("send errors carry the gateway's code: too_large, no_agent", { timeout: 15000 }, async () => {
  const c = client(gw, uniqueUser("big"));
  const n = client(noAgent, uniqueUser("none"));
  try {
    c.connect();
    n.connect();
    await assert.rejects(c.send("x".repeat(40000)), (e) => e instanceof AgentwireError && e.code === "too_large" && typeof e.ref === "string");
    // The connection stays usable after a refused message.
    const { run_id } = await c.send("small");
    assert.match(run_id, /^r-/);
    await assert.rejects(n.send("anyone there?"), (e) => e.code === "no_agent");
    assert.equal(n.status, "open");
  } finally {
    c.close();
    n.close();
  }
});

test("close() rejects what is queued, and send() on a closed client rejects at once", { timeout: 10000 }, async () => {
  const c = client(gw, uniqueUser("closed"));
  await assert.rejects(c.send("not connected"), (e) => e.code === "closed");
  c.connect();
  const queued = c.send("queued, then closed");
  c.close();
  await assert.rejects(queued, (e) => e.code === "closed");
  assert.equal(c.status, "closed");
});

test("maxQueued bounds the queue and the requests in flight", { timeout: 15000 }, async () => {
  const c = client(gw, uniqueUser("queue"), { maxQueued: 2 });
  try {
    c.connect();
    // Before the connection opens: two wait, the third is refused.
    const first = [c.send("one"), c.send("two")];
    await assert.rejects(c.send("three"), (e) => e.code === "queue_full");
    const acks = await Promise.all(first);
    assert.equal(new Set(acks.map((a) => a.run_id)).size, 2);
    // Open: two go out at once, two wait for their answers, a fifth is refused (without
    // the in-flight bound all four would be written and the fifth accepted).
    const more = [1, 2, 3, 4].map((i) => c.send(`more ${i}`));
    await assert.rejects(c.send("five"), (e) => e.code === "queue_full");
    const answers = await Promise.all(more);
    assert.ok(answers.every((a) => typeof a.run_id === "string"), JSON.stringify(answers));
  } finally {
    c.close();
  }
});

test('encoding "agui" is passed on the URL; frames go to `event` as they are, not aggregated', { timeout: 10000 }, async () => {
  const user = uniqueUser("agui");
  const c = client(gw, user, { encoding: "agui", threadId: "t1", mode: "main" });
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    const q = new URL(c.socket.url).searchParams;
    assert.equal(q.get("encoding"), "agui");
    assert.equal(q.get("thread_id"), "t1");
    assert.equal(q.get("mode"), "main");
    assert.equal(q.get("token"), null, "the token travels in Sec-WebSocket-Protocol, not the URL");
    await gw.publish([{ type: "agent_started", user_id: user, thread_id: "t1", run_id: "r-agui", agent_name: "a" }]);
    await waitFor(() => rec.events.length === 1, "one frame");
    assert.equal(rec.events[0].type, "RUN_STARTED");
    assert.equal(rec.events[0].runId, "r-agui");
    assert.equal(c.runs.size, 0, "AG-UI frames are not aggregated");
  } finally {
    c.close();
  }
});

test('auth "query" puts the token in the URL (for gateways reached through proxies that drop subprotocols)', { timeout: 10000 }, async () => {
  const user = uniqueUser("query");
  const c = client(gw, user, { auth: "query" });
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    assert.ok(new URL(c.socket.url).searchParams.get("token"));
    assert.equal(c.connection.user_id, user);
  } finally {
    c.close();
  }
});
