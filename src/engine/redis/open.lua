-- agentwire: open a connection of one user (docs/CLUSTER.md, "The scripts").
-- Runs after the node subscribed to the user's channel, so every event after the top
-- seq read here reaches the node through pub/sub.
--
-- KEYS[1] meta hash (epoch, seq)   KEYS[2] stream (kept events)   KEYS[3] runs hash
-- KEYS[4] the user's connections zset (member "<node_id>\n<conn>", score: opened at)
-- KEYS[5] their leases zset (same members, score: lease end; nodes renew every 5 s)
-- ARGV[1] a fresh epoch (used if none)      ARGV[2] replay_ttl_ms
-- ARGV[3] "1" when the client asks to resume
-- ARGV[4] the client's epoch       ARGV[5] the client's last_seq
-- ARGV[6] most entries returned
-- ARGV[7] this connection's member   ARGV[8] now (ms)   ARGV[9] lease (ms)
-- ARGV[10] max_connections_per_user  ARGV[11] "evict" (evict_oldest) or "reject"
-- ARGV[12] the node channels' prefix ("<prefix>:node:"): an evicted connection's node
--          hears "<conn>" on its channel and closes it with 4002
-- ARGV[13] "1" when the connection wants the history its state starts from (an AG-UI
--          connection, docs/AGUI.md): then every answer but "x" has a sixth element,
--          history: while runs are in progress (or, for an exact resume, events follow
--          last_seq) the kept events up to the starting point (last_seq for an exact
--          resume, else top_seq), oldest first, at most ARGV[6] of them; else {}
--
-- Returns {epoch, top_seq, answer, entries, runs}: answer "n" (not asked), "e" (exact:
-- entries are every event after last_seq up to the top, oldest first), "l" (lost: also
-- when more are kept than ARGV[6]) or "x"
-- (refused: past max_connections_per_user with reject); runs the runs hash as
-- {run_id, json, ...} (at most max_active_runs_per_user).
local meta, stream = KEYS[1], KEYS[2]
local runs = redis.call('HGETALL', KEYS[3])
-- The user's connections on every node: leases that ended are of dead nodes.
local conns, leases = KEYS[4], KEYS[5]
local now, lease = tonumber(ARGV[8]), tonumber(ARGV[9])
local dead = redis.call('ZRANGEBYSCORE', leases, '-inf', now)
for _, m in ipairs(dead) do
  redis.call('ZREM', leases, m)
  redis.call('ZREM', conns, m)
end
redis.call('ZADD', conns, now, ARGV[7])
redis.call('ZADD', leases, now + lease, ARGV[7])
redis.call('PEXPIRE', conns, 3 * lease)
redis.call('PEXPIRE', leases, 3 * lease)
local count = redis.call('ZCARD', conns)
local max = tonumber(ARGV[10])
if ARGV[11] == 'reject' and count > max then
  redis.call('ZREM', conns, ARGV[7])
  redis.call('ZREM', leases, ARGV[7])
  return {'', 0, 'x', {}, {}}
end
if ARGV[11] == 'evict' and count > max then
  -- The oldest `over`, this one left out: one more is read, since this one may score
  -- among the oldest (another node's clock may be ahead).
  local over = count - max
  for _, m in ipairs(redis.call('ZRANGE', conns, 0, over)) do
    if over > 0 and m ~= ARGV[7] then
      over = over - 1
      redis.call('ZREM', conns, m)
      redis.call('ZREM', leases, m)
      local node, conn = string.match(m, '^(.-)\n(.*)$')
      if node then
        redis.call('PUBLISH', ARGV[12] .. node, conn)
      end
    end
  end
end
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
-- The kept events up to `point` (seq ids are "<seq>-0"), when asked and runs are in
-- progress: now, or (`replayed`: an exact resume with events after it) at `point`,
-- whose runs may have ended in the replay. Nothing to rebuild otherwise.
local function history(point, replayed)
  if ARGV[13] ~= '1' or (#runs == 0 and not replayed) or point < 1 then
    return {}
  end
  return redis.call('XRANGE', stream, '-', point .. '-0', 'COUNT', ARGV[6])
end
if ARGV[3] ~= '1' then
  return {epoch, top, 'n', {}, runs, history(top, false)}
end
local after = tonumber(ARGV[5])
if ARGV[4] ~= epoch or after > top then
  return {epoch, top, 'l', {}, runs, history(top, false)}
end
if after == top then
  return {epoch, top, 'e', {}, runs, history(after, false)}
end
local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
if #first == 0 then
  return {epoch, top, 'l', {}, runs, history(top, false)}
end
local first_seq = tonumber(string.match(first[1][1], '^(%d+)'))
if first_seq > after + 1 then
  return {epoch, top, 'l', {}, runs, history(top, false)}
end
local entries = redis.call('XRANGE', stream, (after + 1) .. '-0', '+', 'COUNT', ARGV[6])
-- More kept than this node reads (another node's larger replay_events, or a
-- stream-node-max-entries that lets MAXLEN ~ keep more): not exact, never a hole.
local last = entries[#entries]
if not last or tonumber(string.match(last[1], '^(%d+)')) ~= top then
  return {epoch, top, 'l', {}, runs, history(top, false)}
end
return {epoch, top, 'e', entries, runs, history(after, true)}
