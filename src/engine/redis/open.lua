-- agentwire: open a connection of one user (docs/CLUSTER.md, "The scripts").
-- Runs after the node subscribed to the user's channel, so every event after the top
-- seq read here reaches the node through pub/sub.
--
-- KEYS[1] meta hash (epoch, seq)   KEYS[2] stream (kept events)   KEYS[3] runs hash
-- ARGV[1] a fresh epoch (used if none)      ARGV[2] replay_ttl_ms
-- ARGV[3] "1" when the client asks to resume
-- ARGV[4] the client's epoch       ARGV[5] the client's last_seq
-- ARGV[6] most entries returned
--
-- Returns {epoch, top_seq, answer, entries, runs}: answer "n" (not asked), "e" (exact:
-- entries are every kept event after last_seq, oldest first) or "l" (lost); runs the
-- runs hash as {run_id, json, ...} (at most max_active_runs_per_user).
local meta, stream = KEYS[1], KEYS[2]
local runs = redis.call('HGETALL', KEYS[3])
local epoch = redis.call('HGET', meta, 'epoch')
local top = 0
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
else
  top = tonumber(redis.call('HGET', meta, 'seq')) or 0
end
-- A connection refreshes the user's history (PROTOCOL.md section 9).
redis.call('PEXPIRE', meta, ARGV[2])
redis.call('PEXPIRE', stream, ARGV[2])
if ARGV[3] ~= '1' then
  return {epoch, top, 'n', {}, runs}
end
local after = tonumber(ARGV[5])
if ARGV[4] ~= epoch or after > top then
  return {epoch, top, 'l', {}, runs}
end
if after == top then
  return {epoch, top, 'e', {}, runs}
end
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if #first == 0 then
  return {epoch, top, 'l', {}, runs}
end
local first_seq = tonumber(string.match(first[1][1], '^(%d+)'))
if first_seq > after + 1 then
  return {epoch, top, 'l', {}, runs}
end
local entries = redis.call('XRANGE', stream, (after + 1) .. '-0', '+', 'COUNT', ARGV[6])
return {epoch, top, 'e', entries, runs}
