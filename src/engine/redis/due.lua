-- agentwire: take the runs whose deadline passed in the shared deadline set, at most
-- ARGV[2] of them. Atomic: whichever node runs it first takes a run and no other node
-- takes it before ARGV[3] ms have passed: a taken run's deadline moves that far, and
-- the publish script removes it when the run's run_timeout (or any ending event) is
-- stored. So a run whose timeout was never stored (its node died, the publish failed)
-- is taken again, and the publish script refuses a second run_timeout of an ended run:
-- each silent run gets one (docs/CLUSTER.md).
-- KEYS[1] the run deadlines zset   ARGV[1] now (ms)   ARGV[2] most runs taken
-- ARGV[3] ms until a taken run may be taken again
-- Returns the members taken: JSON arrays [user, run, thread marker, agent].
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local again = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], again, member)
end
return due
