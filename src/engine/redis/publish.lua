-- agentwire: publish one event of one user (docs/CLUSTER.md, "The scripts").
-- Runs atomically in Redis, so the order of seqs is the order of publication on every
-- node. All keys share the user's hash tag {u:<user>}.
--
-- KEYS[1] meta hash (epoch, seq)   KEYS[2] stream (kept events)   KEYS[3] ended runs zset
-- KEYS[4] idempotency keys zset (key -> the seq it was stored as)
-- ARGV[1] JSON before the seq      ARGV[2] JSON after the seq
-- ARGV[3] thread marker: "-" (null) or "+" .. thread_id
-- ARGV[4] run_id                   ARGV[5] "1" when the event ends its run
-- ARGV[6] replay_events (0: keep nothing)   ARGV[7] replay_ttl_ms
-- ARGV[8] the user's pub/sub channel        ARGV[9] a fresh epoch (used if none)
-- ARGV[10] now (ms)                ARGV[11] ended runs remembered per user
-- ARGV[12] the worker's idempotency key ("" none)   ARGV[13] keys remembered per user
--
-- Returns {seq, epoch}; {0, ""} when the run has ended (nothing stored); {-1, seq}
-- when the idempotency key was stored before (a repeat: nothing stored again).
local meta, stream, ended, keys = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local key = ARGV[12]
if key ~= '' then
  local prior = redis.call('ZSCORE', keys, key)
  if prior then
    return {-1, prior}
  end
end
if redis.call('ZSCORE', ended, ARGV[4]) then
  return {0, ''}
end
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  -- A new history: whatever stream is left belongs to a lost one (its meta expired
  -- or was evicted), and its ids would be above the new seqs.
  epoch = ARGV[9]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local json = ARGV[1] .. seq .. ARGV[2]
local keep = tonumber(ARGV[6])
if keep > 0 then
  redis.call('XADD', stream, 'MAXLEN', '~', keep, seq .. '-0', 'j', json, 't', ARGV[3], 'r', ARGV[4])
  redis.call('PEXPIRE', stream, ARGV[7])
end
if ARGV[5] == '1' then
  redis.call('ZADD', ended, ARGV[10], ARGV[4])
  local cap = tonumber(ARGV[11])
  if redis.call('ZCARD', ended) > cap then
    redis.call('ZREMRANGEBYRANK', ended, 0, -cap - 1)
  end
  redis.call('PEXPIRE', ended, ARGV[7])
end
if key ~= '' then
  redis.call('ZADD', keys, seq, key)
  local cap = tonumber(ARGV[13])
  if redis.call('ZCARD', keys) > cap then
    redis.call('ZREMRANGEBYRANK', keys, 0, -cap - 1)
  end
  redis.call('PEXPIRE', keys, ARGV[7])
end
redis.call('PEXPIRE', meta, ARGV[7])
redis.call('PUBLISH', ARGV[8], seq .. '\n' .. ARGV[3] .. '\n' .. ARGV[4] .. '\n' .. json)
return {seq, epoch}
