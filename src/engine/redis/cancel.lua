-- agentwire: a client cancelled a run (docs/CLUSTER.md, "The scripts"). Marks it when
-- it is in progress, so the node that publishes its next event tells the in-process run
-- handle; bounded by the runs in progress (max_active_runs_per_user).
-- KEYS[1] runs hash   KEYS[2] cancelled runs set   ARGV[1] run_id   ARGV[2] ttl (ms)
-- Returns 1 when the run was in progress (marked), 0 otherwise.
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
