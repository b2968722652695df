-- agentwire: take the runs whose deadline passed out of the shared deadline set, at
-- most ARGV[2] of them. Atomic: whichever node runs it first takes a run, no other
-- node can take it again, so each silent run gets one run_timeout (docs/CLUSTER.md).
-- KEYS[1] the run deadlines zset   ARGV[1] now (ms)   ARGV[2] most runs taken
-- Returns the members taken: JSON arrays [user, run, thread marker, agent].
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
if #due > 0 then
  redis.call('ZREM', KEYS[1], unpack(due))
end
return due
