-- agentwire: a run acked by a user_message and not begun yet (docs/CLUSTER.md, "The
-- scripts"). As under the memory engine such a run gets its run_timeout when no event
-- comes within run_idle_timeout_ms: it takes a deadline in the shared set now, so any
-- node's watchdog ends it (also when the node that acked it died), and a client's
-- cancel of it is marked (cancel.lua). Its first event, through any node, removes the
-- deadline and the record (publish.lua) and measures the time from the ack.
-- KEYS[1] runs hash   KEYS[2] ended runs zset   KEYS[3] pending runs hash
-- KEYS[4] the run deadlines zset shared by every user
-- ARGV[1] run_id   ARGV[2] user_id   ARGV[3] now (ms)   ARGV[4] run_idle_timeout_ms
-- ARGV[5] ttl (ms)   ARGV[6] pending runs kept per user at most
-- ARGV[7] thread marker: "-" (null) or "+" .. thread_id
-- The deadline member is publish.lua's, [user, run, thread marker, agent], with agent
-- "" (the memory engine's run_timeout of a run that never began names no agent).
-- Returns 1 when registered, 0 when the run already began or ended (its first event
-- came first, through another node) or is pending already, -1 when the user has
-- ARGV[6] pending runs.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 or redis.call('ZSCORE', KEYS[2], ARGV[1])
    or redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 0
end
if redis.call('HLEN', KEYS[3]) >= tonumber(ARGV[6]) then
  return -1
end
local member = cjson.encode({ARGV[2], ARGV[1], ARGV[7], ''})
redis.call('HSET', KEYS[3], ARGV[1], cjson.encode({m = member, w = tonumber(ARGV[3])}))
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[4], tonumber(ARGV[3]) + tonumber(ARGV[4]), member)
return 1
