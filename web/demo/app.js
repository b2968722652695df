// The agentwire demo page (PROTOCOL.md section 10.2): log in with a user name (a dev
// token from POST /dev/token), ask a question, watch the demo agent's run live through
// the browser client `/agentwire.js` (clients/js, served unchanged): started, thinking
// steps, the tool call with its arguments and result, the streamed answer, completed or
// error; cancel a running run; the connection state, and a resume after a drop.
//
// Everything is drawn with textContent (never innerHTML of received data). The
// data-testid attributes are the contract of the browser tests: login-user,
// login-submit, message-input, message-send, connection-status, run (data-run-id,
// data-status), event (data-type, data-seq), run-cancel.

import { AgentwireClient } from "/agentwire.js";

const $ = (id) => document.getElementById(id);
const USER_KEY = "agentwire-demo-user";

/** Element helper: h("div", {class: "x", dataset: {...}}, child, "text", ...). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) el.append(c);
  return el;
}

const STATUS_LABEL = {
  running: "Running",
  completed: "Completed",
  error: "Error",
  cancelled: "Cancelled",
};

const EVENT_LABEL = {
  agent_started: "started",
  agent_thinking: "thinking",
  tool_executing: "tool call",
  tool_completed: "tool result",
  text_delta: "text",
  agent_completed: "completed",
  agent_error: "error",
};

let client = null;
let user = null;
/** run_id -> the run's DOM parts. */
const views = new Map();
/** run_id -> text this tab sent (the user's bubble before agent_started arrives). */
const asked = new Map();
/** seq of every event drawn since the last reset (a page never draws one twice). */
const drawn = new Set();
let bannerTimer = null;
let everOpen = false;

// ------------------------------------------------------------------ log in / out

async function fetchToken(name) {
  const res = await fetch("/dev/token", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ user_id: name }),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok || typeof body.token !== "string") {
    const why = res.status === 404
      ? "This gateway is not in dev mode: POST /dev/token is off, so the demo page cannot log in."
      : body.message || `The gateway answered ${res.status}.`;
    throw new Error(why);
  }
  return body.token;
}

let loggingIn = false;

async function logIn(name) {
  if (client || loggingIn) return;
  const error = $("login-error");
  const submit = $("login-form").querySelector('[data-testid="login-submit"]');
  error.hidden = true;
  loggingIn = true;
  submit.disabled = true;
  // Check the name and the endpoint once before connecting, to show a clear error.
  try {
    await fetchToken(name);
  } catch (e) {
    error.textContent = e.message;
    error.hidden = false;
    return;
  } finally {
    loggingIn = false;
    submit.disabled = false;
  }
  user = name;
  try {
    sessionStorage.setItem(USER_KEY, name);
  } catch {}
  $("who").textContent = name;
  $("who").hidden = false;
  $("logout").hidden = false;
  $("login-view").hidden = true;
  $("chat-view").hidden = false;
  document.body.classList.add("signed-in");
  everOpen = false;
  client = new AgentwireClient({ url: "/ws", token: () => fetchToken(name) });
  client.on("status", onStatus);
  client.on("event", drawEvent);
  client.on("run", drawRun);
  client.on("reset", onReset);
  client.on("error", (err) => showBanner(`Connection problem: ${err.message}`, "warn"));
  window.agentwireDemo = { client };
  client.connect();
  $("message-input").focus();
}

function logOut() {
  if (client) client.close();
  client = null;
  user = null;
  try {
    sessionStorage.removeItem(USER_KEY);
  } catch {}
  clearConversation();
  setStatus("closed");
  $("who").hidden = true;
  $("logout").hidden = true;
  $("chat-view").hidden = true;
  $("login-view").hidden = false;
  document.body.classList.remove("signed-in");
  $("login-user").focus();
}

// ------------------------------------------------------------------ connection

function setStatus(status) {
  const el = $("status");
  el.textContent = status;
  el.dataset.state = status;
  el.title = {
    connecting: "Connecting to the gateway",
    open: "Connected: events arrive live",
    reconnecting: "Connection lost: reconnecting and resuming",
    evicted: "Another tab of this user took over this connection",
    closed: "Not connected",
  }[status] ?? status;
}

function onStatus(status, detail) {
  setStatus(status);
  if (status === "open") {
    if (everOpen && detail && detail.resumed === true) {
      showBanner(`Reconnected: resumed from event #${client.lastSeq}, nothing missed.`, "ok", 4000);
    } else if (everOpen) {
      hideBanner();
    }
    everOpen = true;
  } else if (status === "reconnecting") {
    showBanner("Connection lost. Reconnecting…", "warn");
  } else if (status === "evicted") {
    const again = h("button", { type: "button", class: "link", text: "Reconnect here", onclick: () => client && client.connect() });
    showBanner("This user opened more tabs than the gateway allows; this one was disconnected. ", "warn", 0, again);
  }
}

function onReset() {
  clearConversation();
  showBanner("Reconnected, but some events were too old to replay: showing what is still running.", "warn", 6000);
}

function showBanner(text, kind, ms = 0, extra = null) {
  const el = $("banner");
  el.replaceChildren(h("span", { text }), ...(extra ? [extra] : []));
  el.dataset.kind = kind;
  el.hidden = false;
  clearTimeout(bannerTimer);
  if (ms > 0) bannerTimer = setTimeout(hideBanner, ms);
}

function hideBanner() {
  clearTimeout(bannerTimer);
  $("banner").hidden = true;
}

// ------------------------------------------------------------------ runs

function clearConversation() {
  views.clear();
  drawn.clear();
  $("conversation").replaceChildren();
  $("empty").hidden = false;
}

function nearBottom() {
  const doc = document.scrollingElement;
  return doc.scrollHeight - doc.scrollTop - doc.clientHeight < 160;
}

function keepScrolled(wasNear) {
  if (wasNear) window.scrollTo({ top: document.scrollingElement.scrollHeight });
}

function json(value) {
  if (value === undefined) return "";
  try {
    return JSON.stringify(value, null, 2);
  } catch {
    return String(value);
  }
}

function formatMs(ms) {
  if (!(ms >= 0)) return "";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
}

/** The DOM of one run (made on first sight), in the order the user reads it. */
function viewOf(runId) {
  let v = views.get(runId);
  if (v) return v;
  const question = h("div", { class: "bubble" });
  const status = h("span", { class: "pill" });
  const meta = h("span", { class: "meta" });
  const cancel = h("button", {
    type: "button",
    class: "cancel",
    "data-testid": "run-cancel",
    text: "Stop",
    onclick: () => cancelRun(runId, cancel),
  });
  const thinkingSummary = h("summary", {});
  const thinkingList = h("ol", { class: "steps" });
  const thinking = h("details", { class: "thinking", hidden: true }, thinkingSummary, thinkingList);
  const tools = h("div", { class: "tools" });
  const answer = h("div", { class: "answer" });
  const notice = h("div", { class: "notice", hidden: true });
  const timeline = h("ol", { class: "timeline", "aria-label": "Events" });
  const agentName = h("span", { class: "agent-name", text: "agent" });
  const card = h(
    "article",
    { class: "run", "data-testid": "run", "data-run-id": runId, "data-status": "running" },
    h("header", { class: "run-head" },
      h("span", { class: "avatar", "aria-hidden": "true" }),
      agentName, status, meta, cancel),
    thinking, tools, answer, notice,
    h("footer", { class: "run-foot" }, h("span", { class: "tl-label", text: "Events" }), timeline),
  );
  const turn = h("li", { class: "turn" }, h("div", { class: "you" }, question), card);
  turn.dataset.runId = runId;
  const wasNear = nearBottom();
  $("conversation").append(turn);
  $("empty").hidden = true;
  keepScrolled(wasNear);
  v = { turn, question, card, status, meta, cancel, thinking, thinkingSummary, thinkingList, tools, answer, notice, timeline, agentName, toolViews: [] };
  views.set(runId, v);
  return v;
}

function drawEvent(ev) {
  if (!ev || typeof ev.run_id !== "string") return;
  if (drawn.has(ev.seq)) return; // the client dedupes already; never draw twice
  drawn.add(ev.seq);
  const v = viewOf(ev.run_id);
  const label = EVENT_LABEL[ev.type] ?? ev.type;
  const item = h("li", {
    class: `ev ev-${ev.type in EVENT_LABEL ? ev.type : "other"}`,
    "data-testid": "event",
    "data-type": ev.type,
    "data-seq": String(ev.seq),
    title: `#${ev.seq} ${ev.type}`,
  });
  if (ev.type !== "text_delta") item.append(h("span", { class: "ev-seq", text: `#${ev.seq}` }), h("span", { text: label }));
  v.timeline.append(item);
}

function drawRun(run) {
  const wasNear = nearBottom();
  const v = viewOf(run.run_id);
  v.card.dataset.status = run.status;
  v.agentName.textContent = run.agent_name ?? "agent";
  v.status.textContent = STATUS_LABEL[run.status] ?? run.status;
  v.status.dataset.status = run.status;

  const started = run.events.find((e) => e.type === "agent_started");
  const text = asked.get(run.run_id) ?? started?.data?.message;
  v.question.textContent = text ?? "(a message from another tab)";
  v.question.classList.toggle("muted", text === undefined);

  const running = run.status === "running";
  v.cancel.hidden = !running;
  if (!running) v.cancel.remove();
  const end = run.ended_ts ?? (running ? null : Date.now());
  const first = run.started_ts ?? run.events[0]?.ts;
  v.meta.textContent = end && first ? formatMs(end - first) : "";

  // Thinking: collapsed, the summary says how far it got.
  const steps = run.thinking;
  v.thinking.hidden = steps.length === 0;
  if (v.thinkingList.children.length !== steps.length) {
    v.thinkingList.replaceChildren(...steps.map((s) => h("li", { text: s })));
  }
  const last = steps[steps.length - 1];
  const live = running && !run.text;
  v.thinkingSummary.replaceChildren(
    h("span", { class: "think-title", text: live ? "Thinking" : `Thought in ${steps.length} step${steps.length === 1 ? "" : "s"}` }),
    ...(live && last ? [h("span", { class: "think-last", text: last })] : []),
  );
  v.thinking.classList.toggle("live", running && !run.text);

  // Tool calls: name, status, arguments and result.
  run.tools.forEach((tool, i) => {
    let tv = v.toolViews[i];
    if (!tv) {
      const name = h("span", { class: "tool-name" });
      const state = h("span", { class: "tool-state" });
      const args = h("pre", { class: "code" });
      const result = h("pre", { class: "code" });
      const resultBox = h("div", { class: "kv" }, h("div", { class: "k", text: "Result" }), result);
      const el = h("section", { class: "tool" },
        h("div", { class: "tool-head" }, h("span", { class: "tool-icon", "aria-hidden": "true" }), name, state),
        h("div", { class: "tool-body" }, h("div", { class: "kv" }, h("div", { class: "k", text: "Arguments" }), args), resultBox));
      v.tools.append(el);
      tv = { el, name, state, args, result, resultBox };
      v.toolViews[i] = tv;
    }
    tv.el.dataset.status = tool.status;
    tv.name.textContent = tool.name ?? "tool";
    tv.state.textContent = tool.status === "running" ? "running…" : tool.status === "error" ? "failed" : "done";
    tv.args.textContent = json(tool.args ?? {});
    const res = tool.status === "error" && tool.error !== undefined ? tool.error : tool.result;
    tv.resultBox.hidden = res === undefined || res === null;
    tv.result.textContent = json(res);
  });

  // The answer: the streamed text is the main thing to read.
  v.answer.textContent = run.text;
  v.answer.classList.toggle("streaming", running && run.text.length > 0);
  v.answer.hidden = run.text.length === 0;

  // How it ended, when not completed; or that this tab joined mid-run.
  let note = null;
  if (run.status === "cancelled") note = ["Stopped. The run was cancelled.", "cancelled"];
  else if (run.status === "error") {
    const reason = run.error?.reason ?? run.error?.message ?? "unknown";
    note = [`The run failed: ${reason}.`, "error"];
  } else if (run.partial && running) note = ["Joined while this run was in progress: its earlier steps happened before this tab connected.", "info"];
  v.notice.hidden = !note;
  if (note) {
    v.notice.textContent = note[0];
    v.notice.dataset.kind = note[1];
  }
  keepScrolled(wasNear);
}

async function cancelRun(runId, button) {
  if (!client) return;
  button.disabled = true;
  button.textContent = "Stopping…";
  try {
    await client.cancel(runId);
  } catch (e) {
    button.disabled = false;
    button.textContent = "Stop";
    showBanner(`Could not stop the run: ${e.code ?? e.message}`, "warn", 4000);
  }
}

// ------------------------------------------------------------------ composer

async function sendMessage(text) {
  const err = $("send-error");
  err.hidden = true;
  if (!client || !text.trim()) return;
  const input = $("message-input");
  input.value = "";
  autosize(input);
  try {
    const { run_id } = await client.send(text.trim());
    asked.set(run_id, text.trim());
    if (views.has(run_id)) drawRun(client.runs.get(run_id) ?? { run_id, status: "running", events: [], thinking: [], tools: [], text: "" });
  } catch (e) {
    const why = {
      no_agent: "No agent is listening for messages on this gateway.",
      busy: "Too many runs are waiting to start; try again in a moment.",
      too_large: "That message is too long.",
      disconnected: "The connection dropped before the gateway answered; the run may still start.",
      timeout: "The gateway did not answer in time.",
    }[e.code] ?? e.message;
    err.textContent = why;
    err.hidden = false;
  }
}

function autosize(el) {
  el.style.height = "auto";
  el.style.height = `${Math.min(el.scrollHeight, 180)}px`;
}

// ------------------------------------------------------------------ wiring

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const name = $("login-user").value.trim();
    if (name) logIn(name);
  });
  $("logout").addEventListener("click", logOut);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    sendMessage($("message-input").value);
  });
  const input = $("message-input");
  input.addEventListener("input", () => autosize(input));
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      sendMessage(input.value);
    }
  });
  for (const chip of $("suggestions").querySelectorAll("button")) {
    chip.addEventListener("click", () => sendMessage(chip.textContent));
  }
  let saved = null;
  try {
    saved = sessionStorage.getItem(USER_KEY);
  } catch {}
  if (saved) {
    $("login-user").value = saved;
    logIn(saved);
  }
});
