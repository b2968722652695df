// The README's snippets run as printed against the real gateway: the Node example, and
// the complete page's module script (with a tiny stand-in for the few DOM calls it makes,
// and `ws` as the browser's WebSocket, since Node 20 has none). The page must stay under
// 40 lines.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readFileSync, writeFileSync, rmSync } from "node:fs";
import { fileURLToPath, pathToFileURL } from "node:url";
import path from "node:path";
import { Gateway, WebSocket, waitFor, uniqueUser } from "../test-support/gateway.js";
import { AgentwireClient } from "../agentwire.js";

const DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const README = readFileSync(path.join(DIR, "README.md"), "utf8");
// The repository's README shows the same complete page ("From a browser").
const ROOT_README = readFileSync(path.join(DIR, "../../README.md"), "utf8");

/** The body of the first fenced block after `heading` with language `lang`. */
function block(heading, lang, readme = README) {
  const at = readme.indexOf(heading);
  assert.ok(at >= 0, `README has ${heading}`);
  const open = readme.indexOf("```" + lang + "\n", at);
  const close = readme.indexOf("\n```", open + 4);
  return readme.slice(open + lang.length + 4, close + 1);
}

const gw = new Gateway();
before(() => gw.start());
after(() => gw.stop());

test("README: the Node example runs as printed", { timeout: 20000 }, async () => {
  const code = block("## From Node", "js");
  const file = path.join(DIR, `.readme-node-${process.pid}.mjs`);
  writeFileSync(file, code);
  try {
    const child = spawn(process.execPath, [file], {
      cwd: DIR,
      env: { ...process.env, AGENTWIRE_WS_URL: gw.wsUrl, AGENTWIRE_TOKEN: gw.token(uniqueUser("readme")) },
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (out += d));
    const killer = setTimeout(() => child.kill("SIGKILL"), 15000);
    const code = await new Promise((r) => child.on("exit", r));
    clearTimeout(killer);
    assert.equal(code, 0, out);
    assert.match(out, /^started r-[0-9a-f]+$/m);
    assert.match(out, /^completed "Here is what I found about \\"What is agentwire\?\\": three sources agree\."$/m);
  } finally {
    rmSync(file, { force: true });
  }
});

/** Just enough DOM for the README page: elements by id, <pre> children, text, forms. */
function fakeDom() {
  const byId = new Map();
  const element = (tag) => {
    const el = {
      tagName: tag.toUpperCase(),
      children: [],
      value: "",
      textContent: "",
      onsubmit: null,
      get firstChild() {
        return this.children[0] ?? null;
      },
      insertBefore(child, ref) {
        const i = ref ? this.children.indexOf(ref) : -1;
        this.children.splice(i >= 0 ? i : this.children.length, 0, child);
        return child;
      },
    };
    let id = "";
    Object.defineProperty(el, "id", {
      get: () => id,
      set: (v) => {
        id = v;
        byId.set(v, el);
      },
    });
    return el;
  };
  for (const [id, tag] of [["status", "b"], ["ask", "form"], ["q", "input"], ["runs", "div"]]) element(tag).id = id;
  return { getElementById: (id) => byId.get(id) ?? null, createElement: element };
}

for (const [name, html] of [
  ["clients/js/README.md", block("## A complete page", "html")],
  ["README.md", block("## From a browser", "html", ROOT_README)],
]) {
  test(`${name}: the complete page (under 40 lines) shows a run live`, { timeout: 20000 }, async () => {
    assert.ok(html.trimEnd().split("\n").length < 40, "the page is under 40 lines");
    for (const id of ["status", "ask", "q", "runs"]) assert.match(html, new RegExp(`id="${id}"`));
    const script = html.slice(html.indexOf('<script type="module">') + 22, html.indexOf("</script>"));
    assert.match(script, /ws:\/\/127\.0\.0\.1:8080\/ws/);
    const file = path.join(DIR, `.readme-page-${process.pid}-${name === "README.md" ? "root" : "js"}.mjs`);
    writeFileSync(file, script.replace("ws://127.0.0.1:8080/ws", gw.wsUrl));
    const user = uniqueUser("page");
    const saved = { document: globalThis.document, location: globalThis.location, WebSocket: globalThis.WebSocket, alert: globalThis.alert };
    const alerts = [];
    globalThis.document = fakeDom();
    globalThis.location = { search: `?token=${gw.token(user)}`, href: "http://127.0.0.1:8000/page.html" };
    globalThis.WebSocket = WebSocket;
    globalThis.alert = (m) => alerts.push(m);
    const $ = (id) => globalThis.document.getElementById(id);
    // The page imports this same module file: note its client so the test can close it.
    const clients = [];
    const connect = AgentwireClient.prototype.connect;
    AgentwireClient.prototype.connect = function () {
      clients.push(this);
      return connect.call(this);
    };
    try {
      await import(pathToFileURL(file).href);
      await waitFor(() => $("status").textContent === "open", "status open", 8000, () => $("status").textContent);
      $("q").value = "What is agentwire?";
      let prevented = false;
      $("ask").onsubmit({ preventDefault: () => (prevented = true) });
      assert.ok(prevented);
      assert.equal($("q").value, "");
      const shown = () => $("runs").children[0]?.textContent ?? "";
      await waitFor(() => shown().startsWith("demo_agent: completed"), "the run shown completed", 15000, shown);
      const lines = shown().split("\n");
      assert.deepEqual(lines, [
        "demo_agent: completed",
        "  thinking: Reading the question",
        "  thinking: Deciding which tool can answer it",
        "  thinking: Planning the search",
        '  web_search({"query":"What is agentwire?"}) = {"hits":3,"top":"A short article about What is agentwire?"}',
        'Here is what I found about "What is agentwire?": three sources agree.',
      ]);
      assert.deepEqual(alerts, []);
    } finally {
      for (const c of clients) c.close();
      AgentwireClient.prototype.connect = connect;
      Object.assign(globalThis, saved);
      rmSync(file, { force: true });
    }
  });
}
