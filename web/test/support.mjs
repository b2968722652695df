// Helpers of the demo page's browser tests: start the real gateway binary
// (AGENTWIRE_BIN, default target/release/agentwire) on a random free port in
// 20000-29999, and Debian's Chromium through playwright-core (never a downloaded
// browser). Everything is bounded: every wait has a deadline.

import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const BIN = process.env.AGENTWIRE_BIN || path.join(ROOT, "target/release/agentwire");
export const CHROMIUM = process.env.CHROMIUM_BIN || "/usr/bin/chromium";
export const SCREENSHOTS = path.join(ROOT, "target/screenshots");
/** Default deadline of one wait in the page, ms. */
export const WAIT_MS = 15_000;

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  const port = 20000 + Math.floor(Math.random() * 10000);
  return new Promise((resolve) => {
    const srv = net.createServer();
    srv.once("error", () => resolve(null));
    srv.listen(port, "127.0.0.1", () => srv.close(() => resolve(port)));
  });
}

/**
 * Start the gateway: dev mode (no JWT key) unless `args` gives one. Resolves when
 * /health answers; `stop()` kills it (SIGTERM, then SIGKILL after 3 s).
 */
export async function startGateway(args = [], { deadlineMs = 20_000 } = {}) {
  if (!existsSync(BIN)) throw new Error(`no gateway binary at ${BIN}: cargo build --release, or set AGENTWIRE_BIN`);
  const started = Date.now();
  for (let attempt = 0; attempt < 10; attempt++) {
    const port = await freePort();
    if (!port) continue;
    const env = { ...process.env, RUST_LOG: "warn" };
    for (const k of Object.keys(env)) if (k.startsWith("AGENTWIRE_")) delete env[k];
    const child = spawn(BIN, ["--listen", `127.0.0.1:${port}`, ...args], { env, stdio: ["ignore", "pipe", "pipe"] });
    let out = "";
    child.stdout.on("data", (d) => { if (out.length < 65536) out += d; });
    child.stderr.on("data", (d) => { if (out.length < 65536) out += d; });
    let exited = false;
    child.on("exit", () => { exited = true; });
    const base = `http://127.0.0.1:${port}`;
    while (!exited && Date.now() - started < deadlineMs) {
      try {
        const res = await fetch(`${base}/health`, { signal: AbortSignal.timeout(1000) });
        if (res.ok) {
          const stop = async () => {
            if (exited) return;
            child.kill("SIGTERM");
            for (let i = 0; i < 30 && !exited; i++) await sleep(100);
            if (!exited) child.kill("SIGKILL");
          };
          return { base, port, child, output: () => out, stop };
        }
      } catch {}
      await sleep(50);
    }
    if (!exited) child.kill("SIGKILL");
    if (Date.now() - started >= deadlineMs) throw new Error(`gateway did not answer /health in time:\n${out}`);
    // Exited early (e.g. the port was taken between the check and the bind): try another.
  }
  throw new Error("could not start the gateway on a free port");
}

/** Debian's Chromium, headless. */
export async function launchBrowser() {
  if (!existsSync(CHROMIUM)) throw new Error(`no Chromium at ${CHROMIUM}: run tools/test_browser.sh (it installs it)`);
  return chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--headless=new", "--disable-gpu", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--no-first-run"],
    timeout: 30_000,
  });
}

/**
 * A new page of a new context at `base`, with every request to another origin
 * recorded (the page must make none) and page errors collected.
 */
export async function openPage(browser, base, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  const foreign = [];
  const errors = [];
  page.on("request", (req) => {
    const url = req.url();
    if (!url.startsWith(base) && !url.startsWith(base.replace("http", "ws")) && !url.startsWith("data:")) foreign.push(url);
  });
  page.on("pageerror", (e) => errors.push(String(e)));
  await page.goto(`${base}/`);
  return { context, page, foreign, errors };
}

export async function logIn(page, user) {
  await page.getByTestId("login-user").fill(user);
  await page.getByTestId("login-submit").click();
  await page.waitForFunction(() => document.querySelector('[data-testid="connection-status"]')?.textContent === "open");
}

/** Ask a question; resolves with the run's locator (the newest run card). */
export async function ask(page, text) {
  const before = await page.getByTestId("run").count();
  await page.getByTestId("message-input").fill(text);
  await page.getByTestId("message-send").click();
  await page.waitForFunction((n) => document.querySelectorAll('[data-testid="run"]').length > n, before);
  return page.getByTestId("run").nth(before);
}

/** Wait until the run card has left `running`; returns its data-status. */
export async function finished(run, timeout = WAIT_MS) {
  const id = await run.getAttribute("data-run-id");
  await run.page().waitForFunction(
    (id) => document.querySelector(`[data-testid="run"][data-run-id="${CSS.escape(id)}"]`)?.dataset.status !== "running",
    id,
    { timeout },
  );
  return run.getAttribute("data-status");
}

/** [{type, seq}] of the events shown in `scope` (a run or the page), in DOM order. */
export async function shownEvents(scope) {
  return scope.locator('[data-testid="event"]').evaluateAll((els) =>
    els.map((e) => ({ type: e.dataset.type, seq: Number(e.dataset.seq) })));
}
