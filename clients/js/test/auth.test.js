// Tokens against the real gateway: refresh before expiry keeps the connection, 4001
// (expired, no refresh) reconnects with a new token and resumes, a 401 refusal asks the
// token function again, a fixed refused token stops, and 4003 (refresh for another
// user) stops for good.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { AgentwireClient, tokenExpiry } from "../agentwire.js";
import { Gateway, WebSocket, waitFor, uniqueUser, record, runEvents } from "../test-support/gateway.js";

const gw = new Gateway();
before(() => gw.start());
after(() => gw.stop());

test("refresh before token_exp keeps the same connection past the first expiry", { timeout: 15000 }, async () => {
  const user = uniqueUser("refresh");
  let calls = 0;
  const c = new AgentwireClient({
    url: gw.wsUrl,
    WebSocket,
    token: () => {
      calls += 1;
      return gw.token(user, 7);
    },
  });
  const rec = record(c);
  const refreshed = [];
  c.on("refreshed", (r) => refreshed.push(r.exp));
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    const firstExp = c.tokenExp;
    assert.equal(firstExp, rec.connected[0].token_exp);
    await waitFor(() => refreshed.length >= 1, "a refresh", 8000);
    // Past the first token's expiry (whole seconds): still the first connection.
    await waitFor(() => Date.now() > firstExp * 1000 + 1000, "the first token's expiry", 10000);
    assert.equal(c.status, "open");
    assert.equal(rec.connected.length, 1, "never reconnected");
    assert.ok(!rec.closes.includes(4001), `closes: ${rec.closes}`);
    assert.ok(c.tokenExp > firstExp, "tokenExp moved on");
    assert.ok(calls >= 2, "the token function was asked again");
    assert.ok(c.stats.refreshes >= 1);
    // The connection still delivers.
    await gw.publish(runEvents(user, "r-after-refresh", ["agent_started"]));
    await waitFor(() => c.runs.has("r-after-refresh"), "event after the refresh");
  } finally {
    c.close();
  }
});

test("4001 without refresh: a new token from the function, resumed:true", { timeout: 15000 }, async () => {
  const user = uniqueUser("expire");
  const tokens = [];
  const c = new AgentwireClient({
    url: gw.wsUrl,
    WebSocket,
    refresh: false,
    token: async () => {
      const t = gw.token(user, tokens.length === 0 ? 2 : 3600);
      tokens.push(t);
      return t;
    },
  });
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open");
    await gw.publish(runEvents(user, "r-exp", ["agent_started", "agent_thinking"]));
    await waitFor(() => rec.seqs.length === 2, "two events");
    await waitFor(() => rec.closes.includes(4001), "close 4001 at the token's expiry", 8000);
    await waitFor(() => rec.connected.length === 2 && c.status === "open", "reconnected", 5000);
    assert.equal(tokens.length, 2, "the token function was asked again after 4001");
    assert.equal(rec.connected[1].resumed, true);
    assert.ok(rec.connected[1].token_exp > rec.connected[0].token_exp);
    await gw.publish(runEvents(user, "r-exp", ["agent_completed"]));
    await waitFor(() => c.runs.get("r-exp")?.status === "completed", "completed");
    assert.deepEqual(rec.seqs, [1, 2, 3]);
  } finally {
    c.close();
  }
});

test("a 401 refusal asks the token function again", { timeout: 10000 }, async () => {
  const user = uniqueUser("refused");
  const given = [];
  const c = new AgentwireClient({
    url: gw.wsUrl,
    WebSocket,
    token: () => {
      // First an already expired token (refused with 401 before the upgrade), then a good one.
      const t = gw.token(user, given.length === 0 ? -3600 : 3600);
      given.push(t);
      return t;
    },
  });
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => c.status === "open", "open after a refusal", 8000);
    assert.equal(given.length, 2);
    assert.ok(tokenExpiry(given[0]) < Date.now() / 1000);
    assert.deepEqual(rec.statuses, ["connecting", "reconnecting", "open"]);
    assert.equal(rec.connected.length, 1);
  } finally {
    c.close();
  }
});

test("a fixed token refused with 401 stops (nothing could cure it)", { timeout: 10000 }, async () => {
  const c = new AgentwireClient({ url: gw.wsUrl, WebSocket, token: "not-a-jwt" });
  const rec = record(c);
  c.connect();
  await waitFor(() => c.status === "closed", "closed", 8000);
  assert.equal(rec.errors[0].code, "token");
  assert.equal(rec.errors[0].status, 401);
  assert.equal(c.socket, null);
});

test("4003 (refresh with another user's token) stops for good", { timeout: 10000 }, async () => {
  const user = uniqueUser("mine");
  let calls = 0;
  const c = new AgentwireClient({
    url: gw.wsUrl,
    WebSocket,
    refreshFraction: 0, // refresh as soon as the connection opens
    token: () => (++calls === 1 ? gw.token(user) : gw.token(uniqueUser("other"))),
  });
  const rec = record(c);
  c.connect();
  await waitFor(() => c.status === "closed", "closed", 8000);
  assert.equal(c.lastClose.code, 4003);
  assert.deepEqual(rec.statuses, ["connecting", "open", "closed"]);
  assert.equal(calls, 2, "no reconnect attempt");
  await assert.rejects(c.send("hello"), (e) => e.code === "closed");
});

test("refresh answered rate_limited or invalid_token is retried later, the connection kept", { timeout: 15000 }, async () => {
  const user = uniqueUser("ratelimit");
  let calls = 0;
  const c = new AgentwireClient({
    url: gw.wsUrl,
    WebSocket,
    refreshFraction: 0, // refresh at once, and again at once after each `refreshed`
    token: () => {
      calls += 1;
      // The second token is garbage: the gateway answers invalid_token.
      return calls === 2 ? "garbage" : gw.token(user);
    },
  });
  const rec = record(c);
  try {
    c.connect();
    await waitFor(() => rec.errors.some((e) => e.code === "invalid_token"), "invalid_token", 8000);
    // Retried after refreshRetryMs with a good token; then the immediate next refresh
    // falls within the gateway's one-per-second limit: rate_limited, retried again.
    await waitFor(() => rec.errors.some((e) => e.code === "rate_limited") && c.stats.refreshes >= 2, "rate_limited, then refreshed", 12000, () => JSON.stringify(rec.errors.map((e) => e.code)));
    assert.equal(c.status, "open");
    assert.equal(rec.connected.length, 1, "the connection was kept throughout");
  } finally {
    c.close();
  }
});
