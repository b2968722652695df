// Memory bounds of the client against the real gateway: at most maxRuns RunStates (the
// oldest ended go first, running ones are kept), at most maxEventsPerRun events,
// thinking steps and tool calls per run, at most maxTextChars of text.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { AgentwireClient } from "../agentwire.js";
import { Gateway, WebSocket, waitFor, uniqueUser, record, runEvents } from "../test-support/gateway.js";

const gw = new Gateway();
before(() => gw.start());
after(() => gw.stop());

test("runs, events, thinking, tools and text stay within their bounds", { timeout: 15000 }, async () => {
  const user = uniqueUser("bounds");
  const c = new AgentwireClient({
    url: gw.wsUrl,
    token: gw.token(user),
    WebSocket,
    maxRuns: 5,
    maxEventsPerRun: 10,
    maxTextChars: 50,
  });
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    // One long run that stays open, then 12 short completed runs.
    const big = runEvents(user, "r-big", [
      "agent_started",
      ...Array(15).fill("agent_thinking"),
      ...Array(15).fill("tool_executing"),
      ...Array(15).fill("text_delta"),
    ], { data: (t, i) => (t === "text_delta" ? { delta: "0123456789" } : t === "tool_executing" ? { tool: `t${i}`, args: {} } : { thought: `step ${i}` }) });
    await gw.publish(big);
    for (let i = 0; i < 12; i++) await gw.publish(runEvents(user, `r-short-${i}`, ["agent_started", "agent_completed"]));
    const total = big.length + 24;
    await waitFor(() => rec.seqs.length === total, "every event", 10000, () => `got ${rec.seqs.length}`);
    assert.equal(c.runs.size, 5);
    // The running run is kept; the newest completed ones fill the rest.
    assert.deepEqual([...c.runs.keys()], ["r-big", "r-short-8", "r-short-9", "r-short-10", "r-short-11"]);
    const r = c.runs.get("r-big");
    assert.equal(r.events.length, 10);
    assert.equal(r.events.at(-1).seq, big.length, "the newest events are kept");
    assert.ok(r.events_dropped > 0);
    assert.ok(r.thinking.length <= 10);
    assert.equal(r.thinking.at(-1), "step 15");
    assert.ok(r.tools.length <= 10);
    assert.equal(r.text.length, 50);
    assert.equal(r.text_truncated, true);
  } finally {
    c.close();
  }
});
