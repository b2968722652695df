-- agentwire: a client cancelled a run (docs/CLUSTER.md, "The scripts"). Marks it when
-- it is in progress or acked and not begun yet (pending.lua), so the node that
-- publishes its next (or first) event tells the in-process run handle; bounded by the
-- runs in progress and pending of the user.
-- KEYS[1] runs hash   KEYS[2] cancelled runs set   KEYS[3] pending runs hash
-- ARGV[1] run_id   ARGV[2] ttl (ms)
-- Returns 1 when the run was in progress or pending (marked), 0 otherwise.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and redis.call('HEXISTS', KEYS[3], ARGV[1]) == 0 then
  return 0
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
