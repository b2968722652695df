-- agentwire: publish one event of one user (docs/CLUSTER.md, "The scripts").
-- Runs atomically in Redis, so the order of seqs is the order of publication on every
-- node. All keys share the user's hash tag {u:<user>}.
--
-- KEYS[1] meta hash (epoch, seq)   KEYS[2] stream (kept events)   KEYS[3] ended runs zset
-- KEYS[4] idempotency keys zset (key -> the seq it was stored as)
-- KEYS[5] runs in progress hash (run_id -> JSON: t thread, a agent, s started_ts,
--         q last_seq, y last_type)
-- KEYS[6] the run deadlines zset shared by every user (members: the JSON array
--         [user, run, thread marker, agent], scored by the time the run times out; JSON
--         because user, run and agent may hold any character, newlines too): not in
--         the user's slot, so this script needs one Redis (not Redis Cluster)
-- KEYS[7] the user's cancelled runs set (runs a client cancelled, while in progress)
-- ARGV[1] JSON before the seq      ARGV[2] JSON after the seq
-- ARGV[3] thread marker: "-" (null) or "+" .. thread_id
-- ARGV[4] run_id                   ARGV[5] "1" when the event ends its run
-- ARGV[6] replay_events (0: keep nothing)   ARGV[7] replay_ttl_ms
-- ARGV[8] the user's pub/sub channel        ARGV[9] a fresh epoch (used if none)
-- ARGV[10] now (ms)                ARGV[11] ended runs remembered per user
-- ARGV[12] the worker's idempotency key ("" none)   ARGV[13] keys remembered per user
-- ARGV[14] agent_name   ARGV[15] the event's ts (ms)   ARGV[16] the event's type
-- ARGV[17] max_active_runs_per_user   ARGV[18] run_idle_timeout_ms   ARGV[19] user_id
-- KEYS[8] the user's pending runs hash (pending.lua: run_id -> {m: its deadline member,
--         w: when its user_message was acked, ms})
-- ARGV[20] max_active_runs (runs in progress over all users: the deadline set's size)
-- ARGV[21] the event's tool_call_id ("" none; read for tool_executing/tool_completed)
--
-- Returns {seq, epoch ("" unless seq is 1), cancelled, began, age, since, tool} (began 1 when this event is
-- its run's first, age: ms from the run's first event's ts to now, for the run metrics;
-- cancelled 1 when a client cancelled the run, so the node tells its in-process run
-- handle; since: ms from the user_message's ack to this first event, -1 when the run
-- was not acked by one; tool: ms a tool call took, when this tool_completed finishes
-- one, else -1); {0, ""} when the run has ended (nothing stored); {-1, seq}
-- when the idempotency key was stored before (a repeat: nothing stored again); {-2, ""}
-- when the event would start a run past max_active_runs_per_user or max_active_runs
-- (nothing stored; an event that ends its run starts none; a run acked by a
-- user_message, pending, has its place already).
local meta, stream, ended, keys = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local runs, deadlines = KEYS[5], KEYS[6]
local key = ARGV[12]
if key ~= '' then
  local prior = redis.call('ZSCORE', keys, key)
  if prior then
    return {-1, prior}
  end
end
local member = cjson.encode({ARGV[19], ARGV[4], ARGV[3], ARGV[14]})
local run = redis.call('HGET', runs, ARGV[4])
-- A run in progress has not ended (ending it removes it from the runs hash in the same
-- script): the ended runs are looked up only for a run not in progress. So any script
-- that adds a run to `ended` must also remove it from the runs hash.
if not run and redis.call('ZSCORE', ended, ARGV[4]) then
  if ARGV[5] == '1' then
    -- A second run_timeout (the watchdog took the run again): no deadline is left.
    redis.call('ZREM', deadlines, member)
  end
  return {0, ''}
end
-- The run's record, decoded once.
local was = run and cjson.decode(run)
-- [runs cluster-wide] A pending run (acked, not begun: pending.lua) counts among the
-- user's runs and in the deadline set (one member per run in progress or pending, over
-- all users: ZCARD is O(1)), as the memory engine counts pre-registered runs. A run in
-- progress is never pending (pending.lua refuses it; its first event removes the
-- record), so the pending hash is read only for a run not in progress.
local pend = not run and redis.call('HGET', KEYS[8], ARGV[4])
-- An event that ends its run starts none: never refused for the cap.
if not run and not pend and ARGV[5] ~= '1' and
    (redis.call('HLEN', runs) + redis.call('HLEN', KEYS[8]) >= tonumber(ARGV[17]) or
     redis.call('ZCARD', deadlines) >= tonumber(ARGV[20])) then
  return {-2, ''}
end
local seq = redis.call('HINCRBY', meta, 'seq', '1')
-- The seq as text once (each `..` of a number formats it anew).
local sseq = tostring(seq)
-- The epoch is looked up only for a user's first seq (the node does not read it back
-- otherwise: answered "" then).
local epoch = ''
if seq == 1 then
  epoch = redis.call('HGET', meta, 'epoch')
  if not epoch then
    -- A new history: whatever stream is left belongs to a lost one (its meta expired
    -- or was evicted), and its ids would be above the new seqs.
    epoch = ARGV[9]
    redis.call('DEL', stream)
    redis.call('HSET', meta, 'epoch', epoch)
  end
end
local json = ARGV[1] .. sseq .. ARGV[2]
if tonumber(ARGV[6]) > 0 then
  redis.call('XADD', stream, 'MAXLEN', '~', ARGV[6], sseq .. '-0', 'j', json, 't', ARGV[3], 'r', ARGV[4])
  redis.call('PEXPIRE', stream, ARGV[7])
end
if run then
  -- The run's deadline was set under its last thread and agent: an event that names
  -- others moves it (one deadline per run, so one run_timeout).
  local marker = '-'
  if was.t then
    marker = '+' .. was.t
  end
  -- Same thread and agent: the same member (encoded only when they differ).
  if marker ~= ARGV[3] or was.a ~= ARGV[14] then
    redis.call('ZREM', deadlines, cjson.encode({ARGV[19], ARGV[4], marker, was.a}))
  end
end
local cancelled = redis.call('SISMEMBER', KEYS[7], ARGV[4])
-- [runs cluster-wide] The first event of a pending run: its pending deadline goes (the
-- run's own is set below), and the wait since the ack is measured.
local since = -1
if pend then
  local p = cjson.decode(pend)
  redis.call('ZREM', deadlines, p.m)
  redis.call('HDEL', KEYS[8], ARGV[4])
  since = math.max(0, tonumber(ARGV[10]) - p.w)
end
-- [tool durations] A run's open tool calls (at most 8, oldest forgotten) are kept in
-- its record as o = {{tool_call_id or false, start ms}, ...}.
local tool = -1
if ARGV[5] == '1' then
  redis.call('SREM', KEYS[7], ARGV[4])
  redis.call('HDEL', runs, ARGV[4])
  redis.call('ZREM', deadlines, member)
  redis.call('ZADD', ended, ARGV[10], ARGV[4])
  local cap = tonumber(ARGV[11])
  if redis.call('ZCARD', ended) > cap then
    redis.call('ZREMRANGEBYRANK', ended, 0, -cap - 1)
  end
  redis.call('PEXPIRE', ended, ARGV[7])
else
  local started = ARGV[15]
  if run then
    started = was.s
  end
  local rec = {a = ARGV[14], s = tonumber(started), q = seq, y = ARGV[16]}
  if ARGV[3] ~= '-' then
    rec.t = string.sub(ARGV[3], 2)
  end
  -- [tool durations]
  local open = {}
  if run then
    open = was.o or {}
  end
  local id = ARGV[21]
  if ARGV[16] == 'tool_executing' then
    if #open >= 8 then
      table.remove(open, 1)
    end
    table.insert(open, {id ~= '' and id, tonumber(ARGV[10])})
  elseif ARGV[16] == 'tool_completed' and #open > 0 then
    local at = nil
    if id == '' then
      at = 1
    else
      for i, o in ipairs(open) do
        if o[1] == id then
          at = i
          break
        end
      end
    end
    if at then
      tool = math.max(0, tonumber(ARGV[10]) - open[at][2])
      table.remove(open, at)
    end
  end
  if #open > 0 then
    rec.o = open
  end
  redis.call('HSET', runs, ARGV[4], cjson.encode(rec))
  redis.call('ZADD', deadlines, tonumber(ARGV[10]) + tonumber(ARGV[18]), member)
end
-- Runs outlive idle history: the watchdog ends them first.
redis.call('PEXPIRE', runs, math.max(tonumber(ARGV[7]), 2 * tonumber(ARGV[18])))
if key ~= '' then
  redis.call('ZADD', keys, sseq, key)
  local cap = tonumber(ARGV[13])
  if redis.call('ZCARD', keys) > cap then
    redis.call('ZREMRANGEBYRANK', keys, 0, -cap - 1)
  end
  redis.call('PEXPIRE', keys, ARGV[7])
end
redis.call('PEXPIRE', meta, ARGV[7])
-- The run id may hold newlines: its length in bytes comes first.
redis.call('PUBLISH', ARGV[8], sseq .. '\n' .. ARGV[3] .. '\n' .. #ARGV[4] .. '\n' .. ARGV[4] .. json)
local began, first_ts = 1, tonumber(ARGV[15])
if run then
  began, first_ts = 0, tonumber(was.s)
end
return {seq, epoch, cancelled, began, math.max(0, tonumber(ARGV[10]) - first_ts), since, tool}
