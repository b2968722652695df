// The demo page (PROTOCOL.md section 10.2) in Debian's Chromium against the real
// gateway binary: the golden path, cancel, two tabs of one user, two users, a dropped
// connection (reconnect and resume, nothing shown twice), the 390 px layout, the
// page and /dev/token off outside dev mode. Screenshots of a finished run go to
// target/screenshots/. Every test has a deadline.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import path from "node:path";
import { startGateway, launchBrowser, openPage, logIn, ask, finished, shownEvents, SCREENSHOTS, WAIT_MS } from "./support.mjs";

const CRITICAL = ["agent_started", "agent_thinking", "tool_executing", "tool_completed", "agent_completed"];
// A long question: the demo agent streams its answer word by word, so this run lasts
// long enough to drop the connection in the middle of it.
const LONG_QUESTION = "How does a gateway keep " + Array.from({ length: 30 }, (_, i) => `stream${i}`).join(" ") + " in order?";

let gw;
let browser;

before(async () => {
  gw = await startGateway();
  browser = await launchBrowser();
}, { timeout: 60_000 });

after(async () => {
  await browser?.close();
  await gw?.stop();
}, { timeout: 30_000 });

function assertIncreasingUnique(events, what) {
  const seqs = events.map((e) => e.seq);
  assert.ok(seqs.every((s) => Number.isInteger(s) && s > 0), `${what}: integer seqs ${seqs}`);
  assert.equal(new Set(seqs).size, seqs.length, `${what}: no event shown twice: ${seqs}`);
  for (let i = 1; i < seqs.length; i++) assert.ok(seqs[i] > seqs[i - 1], `${what}: increasing data-seq: ${seqs}`);
}

test("golden path: log in, ask, watch thinking, the tool call, the streamed answer, completed", { timeout: 60_000 }, async () => {
  const { context, page, foreign, errors } = await openPage(browser, gw.base);
  try {
    for (const id of ["login-user", "login-submit", "connection-status"]) {
      assert.equal(await page.getByTestId(id).count(), 1, id);
    }
    await logIn(page, "ada");
    assert.equal(await page.getByTestId("connection-status").textContent(), "open");
    const run = await ask(page, "What is agentwire?");
    assert.equal(await run.getAttribute("data-status"), "running");
    assert.match(await run.getAttribute("data-run-id"), /\S/);
    assert.equal(await finished(run), "completed");

    const events = await shownEvents(run);
    assertIncreasingUnique(events, "golden run");
    const types = events.map((e) => e.type);
    // The five critical events, in order, with text_delta between the tool and the end.
    let at = -1;
    for (const t of CRITICAL) {
      const i = types.indexOf(t, at + 1);
      assert.ok(i > at, `${t} after the previous critical event: ${types}`);
      at = i;
    }
    assert.equal(types.filter((t) => t === "agent_thinking").length, 3, `three thinking steps: ${types}`);
    assert.ok(types.includes("text_delta"), "streamed text");
    assert.equal(types[types.length - 1], "agent_completed");
    // Consecutive seqs within this user's only run: nothing missing.
    assert.equal(events[events.length - 1].seq - events[0].seq + 1, events.length, "no hole");

    // What a person reads: the question, the steps, the tool with args and result, the answer.
    const text = await run.innerText();
    assert.match(await page.locator(".bubble").first().innerText(), /What is agentwire\?/);
    await run.locator("details.thinking summary").click();
    await page.waitForFunction(() => document.querySelector("details.thinking")?.open);
    for (const step of ["Reading the question", "Deciding which tool can answer it", "Planning the search"]) {
      assert.ok((await run.innerText()).includes(step), step);
    }
    assert.match(text, /web_search/);
    assert.match(text, /"query": "What is agentwire\?"/, "tool arguments");
    assert.match(text, /"hits": 3/, "tool result");
    assert.match(text, /A short article about What is agentwire\?/);
    assert.match(await run.locator(".answer").innerText(), /^Here is what I found about "What is agentwire\?": three sources agree\.$/);
    assert.match(text, /Completed/);
    assert.equal(await run.getByTestId("run-cancel").count(), 0, "no cancel button on a finished run");

    mkdirSync(SCREENSHOTS, { recursive: true });
    await page.screenshot({ path: path.join(SCREENSHOTS, "demo-1280x800.png"), animations: "disabled" });
    await page.setViewportSize({ width: 390, height: 844 });
    await page.evaluate(() => window.scrollTo(0, document.body.scrollHeight));
    await page.screenshot({ path: path.join(SCREENSHOTS, "demo-390x844.png"), animations: "disabled" });
    assert.deepEqual(foreign, [], "no request leaves the gateway's origin");
    assert.deepEqual(errors, [], "no page errors");
  } finally {
    await context.close();
  }
});

test("cancel: a running run ends cancelled", { timeout: 60_000 }, async () => {
  const { context, page } = await openPage(browser, gw.base);
  try {
    await logIn(page, "cancel-user");
    const run = await ask(page, LONG_QUESTION);
    const cancel = run.getByTestId("run-cancel");
    await cancel.click({ timeout: WAIT_MS });
    const status = await finished(run);
    assert.ok(["cancelled", "error"].includes(status), `status ${status}`);
    const types = (await shownEvents(run)).map((e) => e.type);
    assert.equal(types[types.length - 1], "agent_error", `${types}`);
    assert.ok(!types.includes("agent_completed"), `${types}`);
    assert.equal(await run.getByTestId("run-cancel").count(), 0, "the cancel button leaves with the run");
    assert.match(await run.innerText(), /cancelled/i);
  } finally {
    await context.close();
  }
});

test("two tabs of one user show the same run", { timeout: 60_000 }, async () => {
  const a = await openPage(browser, gw.base);
  const b = await openPage(browser, gw.base);
  try {
    await logIn(a.page, "twin");
    await logIn(b.page, "twin");
    const runA = await ask(a.page, "Shown in both tabs?");
    const id = await runA.getAttribute("data-run-id");
    const runB = b.page.locator(`[data-testid="run"][data-run-id="${id}"]`);
    await runB.waitFor();
    assert.equal(await finished(runA), "completed");
    assert.equal(await finished(runB), "completed");
    const evA = await shownEvents(runA);
    const evB = await shownEvents(runB);
    assert.deepEqual(evB, evA, "same events, same seqs");
    assert.equal(await runB.locator(".answer").innerText(), await runA.locator(".answer").innerText());
    assert.match(await b.page.locator(".bubble").first().innerText(), /Shown in both tabs\?/);
  } finally {
    await a.context.close();
    await b.context.close();
  }
});

test("two users see only their own runs", { timeout: 60_000 }, async () => {
  const a = await openPage(browser, gw.base);
  const b = await openPage(browser, gw.base);
  try {
    await logIn(a.page, "alice");
    await logIn(b.page, "bob");
    const runA = await ask(a.page, "Alice's question");
    const runB = await ask(b.page, "Bob's question");
    assert.equal(await finished(runA), "completed");
    assert.equal(await finished(runB), "completed");
    assert.equal(await a.page.getByTestId("run").count(), 1);
    assert.equal(await b.page.getByTestId("run").count(), 1);
    assert.doesNotMatch(await a.page.locator("main").innerText(), /Bob/);
    assert.doesNotMatch(await b.page.locator("main").innerText(), /Alice/);
  } finally {
    await a.context.close();
    await b.context.close();
  }
});

test("a dropped connection reconnects, resumes and shows nothing twice", { timeout: 60_000 }, async () => {
  const { context, page, errors } = await openPage(browser, gw.base);
  try {
    await logIn(page, "dropper");
    await page.evaluate(() => {
      window.__statuses = [];
      window.agentwireDemo.client.on("status", (s) => window.__statuses.push(s));
    });
    const run = await ask(page, LONG_QUESTION);
    // Drop the socket in the middle of the run (after the answer began to stream).
    await run.locator('[data-testid="event"][data-type="text_delta"]').first().waitFor();
    await page.evaluate(() => window.agentwireDemo.client.socket.close());
    await page.waitForFunction(() => window.__statuses.includes("reconnecting"));
    await page.waitForFunction(() => window.__statuses.at(-1) === "open" && window.__statuses.includes("reconnecting"));
    assert.equal(await page.getByTestId("connection-status").textContent(), "open");
    await page.locator("#banner", { hasText: "resumed" }).waitFor();
    assert.equal(await finished(run), "completed");
    const events = await shownEvents(page);
    assertIncreasingUnique(events, "after the drop");
    assert.equal(events[events.length - 1].seq - events[0].seq + 1, events.length, "no hole after the resume");
    const types = events.map((e) => e.type);
    for (const t of CRITICAL) assert.equal(types.filter((x) => x === t).length, t === "agent_thinking" ? 3 : 1, `${t} once: ${types}`);
    assert.match(await run.locator(".answer").innerText(), /three sources agree\.$/);
    const statuses = await page.evaluate(() => window.__statuses);
    assert.ok(statuses.indexOf("reconnecting") < statuses.lastIndexOf("open"), `reconnecting, then open: ${statuses}`);
    assert.deepEqual(errors, []);
  } finally {
    await context.close();
  }
});

test("a fourth tab of one user evicts the oldest, which says so and stays put", { timeout: 60_000 }, async () => {
  // max_connections_per_user is 3 by default, policy evict_oldest (close 4002).
  const tabs = [];
  try {
    for (let i = 0; i < 4; i++) {
      const tab = await openPage(browser, gw.base);
      tabs.push(tab);
      await logIn(tab.page, "many-tabs");
    }
    const first = tabs[0].page;
    await first.waitForFunction(() => document.querySelector('[data-testid="connection-status"]').textContent === "evicted");
    await first.locator("#banner", { hasText: "disconnected" }).waitFor();
    for (const tab of tabs.slice(1)) {
      assert.equal(await tab.page.getByTestId("connection-status").textContent(), "open");
    }
    // The evicted tab does not reconnect by itself (no eviction loop): the others stay open.
    const stats = await (await fetch(`${gw.base}/ws/stats`)).json();
    assert.ok(stats.connections.open >= 3, JSON.stringify(stats.connections));
    assert.equal(await first.getByTestId("connection-status").textContent(), "evicted");
  } finally {
    for (const tab of tabs) await tab.context.close();
  }
});

test("390 px wide: no horizontal scroll, with a finished run on screen", { timeout: 60_000 }, async () => {
  const { context, page } = await openPage(browser, gw.base, { width: 390, height: 844 });
  try {
    const noScroll = () => page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth);
    assert.ok(await noScroll(), "login view fits");
    await logIn(page, "a-rather-long-user-name-for-a-narrow-phone-screen");
    const run = await ask(page, "Averyveryverylongwordwithoutanyspacesthatcouldoverflowanarrowscreenifnotwrapped and more");
    assert.equal(await finished(run), "completed");
    assert.ok(await noScroll(), "chat view fits");
    const box = await run.boundingBox();
    assert.ok(box.x >= 0 && box.x + box.width <= 390, `run card within the screen: ${JSON.stringify(box)}`);
  } finally {
    await context.close();
  }
});

test("outside dev mode: GET / and POST /dev/token are 404", { timeout: 60_000 }, async () => {
  const prod = await startGateway(["--jwt-secret", "a-test-secret-of-32-bytes-000000"]);
  try {
    for (const p of ["/", "/agentwire.js", "/demo/app.js", "/demo/style.css"]) {
      const res = await fetch(prod.base + p);
      assert.equal(res.status, 404, p);
    }
    const tok = await fetch(prod.base + "/dev/token", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ user_id: "x" }),
    });
    assert.equal(tok.status, 404);
    // In a browser too: the page is not there.
    const context = await browser.newContext();
    try {
      const page = await context.newPage();
      const res = await page.goto(prod.base + "/");
      assert.equal(res.status(), 404);
    } finally {
      await context.close();
    }
  } finally {
    await prod.stop();
  }
});

test("dev mode: the assets' content types and POST /dev/token", { timeout: 30_000 }, async () => {
  const types = { "/": "text/html", "/agentwire.js": "text/javascript", "/demo/app.js": "text/javascript", "/demo/style.css": "text/css" };
  for (const [p, want] of Object.entries(types)) {
    const res = await fetch(gw.base + p);
    assert.equal(res.status, 200, p);
    assert.ok(res.headers.get("content-type").startsWith(want), `${p}: ${res.headers.get("content-type")}`);
  }
  const ok = await fetch(gw.base + "/dev/token", { method: "POST", body: JSON.stringify({ user_id: "u1" }) });
  assert.equal(ok.status, 200);
  assert.match((await ok.json()).token, /^[\w-]+\.[\w-]+\.[\w-]+$/);
  const bad = await fetch(gw.base + "/dev/token", { method: "POST", body: JSON.stringify({ user_id: "" }) });
  assert.equal(bad.status, 400);
});
