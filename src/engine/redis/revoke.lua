-- Revoke a user on every node (PROTOCOL.md section 12; docs/CLUSTER.md "Revocation").
-- KEYS[1] the revocations in force (sorted set: user -> until, epoch seconds)
-- KEYS[2] the revocation channel every node listens on
-- ARGV: user, until (0: none, only a disconnect), now (epoch s), cap, origin node id
-- Stores (user, until) unless `cap` other users are revoked and in force (then -1),
-- then publishes `<until>\n<origin>\n<user>` in any case (the connections close).
-- Answers 1 stored, 0 nothing to store (no until), -1 full.
local till = tonumber(ARGV[2])
local stored = 0
if till > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
  if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[4]) then
    redis.call('ZADD', KEYS[1], till, ARGV[1])
    local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
    redis.call('EXPIREAT', KEYS[1], last[2])
    stored = 1
  else
    stored = -1
  end
end
redis.call('PUBLISH', KEYS[2], ARGV[2] .. '\n' .. ARGV[5] .. '\n' .. ARGV[1])
return stored
