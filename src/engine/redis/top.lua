-- agentwire: a user's epoch and top seq, without creating anything (after a
-- reconnect to Redis, to find what pub/sub lost). Returns {epoch or "", top_seq}.
-- KEYS[1] meta hash
local v = redis.call('HMGET', KEYS[1], 'epoch', 'seq')
if not v[1] then
  return {'', 0}
end
return {v[1], tonumber(v[2]) or 0}
