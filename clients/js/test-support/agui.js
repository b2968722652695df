// Shared by the AG-UI tests (test/agui.test.mjs: memory engine; test/agui_redis.test.mjs:
// Redis engine): a raw `encoding=agui` socket, and the checks every frame and every run
// must pass with AG-UI's own code (`@ag-ui/core`'s zod `EventSchema`, `@ag-ui/client`'s
// `verifyEvents`, 1.0.0) plus what PROTOCOL.md section 11 adds.

import assert from "node:assert/strict";
import { EventSchema } from "@ag-ui/core/schemas";
import { verifyEvents } from "@ag-ui/client";
import { from, lastValueFrom, toArray } from "rxjs";
import { WebSocket } from "./gateway.js";

/** A raw `encoding=agui` socket for `user` on gateway `gw`: `frames` (after `connected`), `connected`. */
export function connectAgui(gw, user, query = "") {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${gw.wsUrl}?token=${gw.token(user)}&encoding=agui${query}`);
    ws.frames = [];
    ws.on("message", (data) => {
      const f = JSON.parse(String(data));
      if (f.type === "connected") {
        ws.connected = f;
        resolve(ws);
      } else {
        ws.frames.push(f);
      }
    });
    ws.on("close", (code) => reject(new Error(`closed ${code} before connected`)));
    ws.on("error", reject);
  });
}

export function closeSocket(ws) {
  return new Promise((resolve) => {
    if (ws.readyState === WebSocket.CLOSED) return resolve();
    ws.once("close", resolve);
    ws.close();
  });
}

/** Frames of the gateway itself (answers to client messages), not AG-UI events. */
const CONTROL = new Set(["ack", "pong", "error", "refreshed", "cancel_requested"]);
export const aguiFrames = (frames) => frames.filter((f) => !CONTROL.has(f.type));
export const ended = (frames, runId) => frames.some((f) => f.runId === runId && (f.type === "RUN_FINISHED" || f.type === "RUN_ERROR"));
export const typesOf = (frames, runId) => frames.filter((f) => f.runId === runId).map((f) => f.type);

/** Every frame against AG-UI's schema, plus what section 11 adds. */
export function validate(frames) {
  assert.ok(frames.length > 0, "frames to validate");
  for (const f of frames) {
    const r = EventSchema.safeParse(f);
    assert.ok(r.success, `schema: ${JSON.stringify(f)}: ${r.error?.message}`);
    assert.equal(typeof f.runId, "string", `runId on every frame: ${JSON.stringify(f)}`);
    assert.ok(Number.isInteger(f.timestamp), `integer timestamp: ${JSON.stringify(f)}`);
    assert.ok(Number.isInteger(f.metadata?.seq) && typeof f.metadata?.epoch === "string", `metadata: ${JSON.stringify(f)}`);
    assert.deepEqual(Object.keys(f.metadata).sort(), ["epoch", "seq"]);
    for (const [k, v] of Object.entries(f)) {
      if (!(f.type === "CUSTOM" && k === "value")) assert.notEqual(v, null, `null ${k} in ${JSON.stringify(f)}`);
    }
    if (f.type === "RUN_ERROR") assert.equal(typeof f.threadId, "string", "RUN_ERROR carries threadId");
  }
}

/** Split by runId; each run's frames through verifyEvents (which throws on a violation). */
export async function verifyRuns(frames) {
  const runs = new Map();
  for (const f of frames) {
    if (!runs.has(f.runId)) runs.set(f.runId, []);
    runs.get(f.runId).push(f);
  }
  for (const [runId, events] of runs) {
    const out = await lastValueFrom(from(events).pipe(verifyEvents(), toArray())).catch((e) => {
      throw new Error(`verifyEvents on run ${runId}: ${e.message}\n${events.map((f) => f.type).join(" ")}`);
    });
    assert.equal(out.length, events.length);
  }
  return runs;
}
