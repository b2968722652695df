// The .d.ts is held to the module: the README's usage type-checks against
// agentwire.d.ts (and misuse does not), and agentwire.js itself passes `tsc --checkJs`.
// Uses the pinned `typescript` devDependency; no gateway needed.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { fileURLToPath } from "node:url";
import path from "node:path";

const DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..");
const TSC = path.join(DIR, "node_modules/typescript/bin/tsc");
const COMMON = ["--noEmit", "--target", "es2022", "--module", "nodenext", "--moduleResolution", "nodenext", "--lib", "es2022,dom"];

function tsc(args) {
  const r = spawnSync(process.execPath, [TSC, ...COMMON, ...args], { cwd: DIR, encoding: "utf8", timeout: 60000 });
  return { status: r.status, out: `${r.stdout}${r.stderr}` };
}

test("agentwire.d.ts: the documented usage type-checks, misuse is refused", { timeout: 90000 }, () => {
  const r = tsc(["--strict", "test-support/types-check.ts"]);
  assert.equal(r.status, 0, r.out);
});

test("agentwire.js passes tsc --checkJs against its own types", { timeout: 90000 }, () => {
  const r = tsc(["--allowJs", "--checkJs", "agentwire.js"]);
  assert.equal(r.status, 0, r.out);
});
