// Eviction (4002) against the real gateway: the evicted client says `evicted` and does
// not reconnect by itself (so tabs over the per-user limit never evict each other in a
// loop) until connect() is called again, which resumes.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { AgentwireClient } from "../agentwire.js";
import { Gateway, WebSocket, waitFor, uniqueUser, record, runEvents } from "../test-support/gateway.js";

const gw = new Gateway();
before(() => gw.start());
after(() => gw.stop());

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function client(user) {
  return new AgentwireClient({ url: gw.wsUrl, token: () => gw.token(user), WebSocket });
}

test("4002: status evicted, no reconnect, connect() again resumes", { timeout: 15000 }, async () => {
  const user = uniqueUser("evict");
  const c = client(user);
  const rec = record(c);
  const raws = [];
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    await gw.publish(runEvents(user, "r-ev", ["agent_started"]));
    await waitFor(() => rec.seqs.length === 1, "one event");
    const pending = c.send("in flight while evicted?").catch((e) => e);
    for (let i = 0; i < 3; i++) raws.push(await gw.rawConnect(user));
    await waitFor(() => c.status === "evicted", "evicted");
    assert.equal(c.lastClose.code, 4002);
    assert.ok(rec.closes.includes(4002));
    const err = await pending;
    // The send was either acked before the eviction or rejected by it.
    assert.ok(err.run_id || ["evicted", "disconnected"].includes(err.code), String(err));
    // Nothing reconnects: the three newer connections stay open, the client evicted.
    await sleep(2500);
    assert.equal(c.status, "evicted");
    assert.equal(rec.connected.length, 1);
    for (const ws of raws) assert.equal(ws.closeCode, null, "no newer connection was evicted");
    await assert.rejects(c.send("while evicted"), (e) => e.code === "evicted");
    // The page decides to come back: it evicts the oldest raw connection and resumes.
    await gw.publish(runEvents(user, "r-ev", ["agent_completed"]));
    c.connect();
    await waitFor(() => c.status === "open", "open again");
    assert.equal(rec.connected.at(-1).resumed, true);
    await waitFor(() => c.runs.get("r-ev")?.status === "completed", "event missed while evicted");
    if (err.run_id) await waitFor(() => c.runs.get(err.run_id)?.status === "completed", "the demo run", 10000);
    // Everything of the user (r-ev, and the demo run when the send was acked), each
    // event once, no hole.
    const last = rec.seqs.at(-1);
    assert.deepEqual(rec.seqs, Array.from({ length: last }, (_, i) => i + 1));
    await waitFor(() => raws[0].closeCode === 4002, "the oldest raw connection evicted");
  } finally {
    c.close();
    for (const ws of raws) ws.terminate();
  }
});

test("four clients of one user: one evicted, three open, no eviction loop", { timeout: 15000 }, async () => {
  const user = uniqueUser("tabs");
  const tabs = [];
  const evictedBefore = (await gw.stats()).connections.closed_by_reason?.evicted ?? 0;
  try {
    for (let i = 0; i < 4; i++) {
      const c = client(user);
      tabs.push(c);
      c.connect();
      await waitFor(() => c.status === "open", `tab ${i} open`);
    }
    await waitFor(() => tabs[0].status === "evicted", "the oldest tab evicted");
    await sleep(2500);
    assert.deepEqual(tabs.map((t) => t.status), ["evicted", "open", "open", "open"]);
    assert.deepEqual(tabs.map((t) => t.stats.reconnects), [0, 0, 0, 0]);
    const st = await gw.stats();
    assert.equal(st.connections.closed_by_reason.evicted - evictedBefore, 1, "exactly one eviction");
  } finally {
    for (const t of tabs) t.close();
  }
});
