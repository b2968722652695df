-- agentwire: renew the leases of this node's connections (every 5 s), so they keep
-- counting toward max_connections_per_user cluster-wide; the connections of a node that
-- stopped renewing (it died) stop counting when their lease ends (15 s).
-- KEYS: per connection, its user's leases zset then its user's connections zset
--       (several users: one Redis, not Redis Cluster).
-- ARGV[1] lease end (ms)   ARGV[2] now (ms)   ARGV[3..] the members, one per connection
for i = 3, #ARGV do
  local k = (i - 3) * 2
  redis.call('ZADD', KEYS[k + 1], ARGV[1], ARGV[i])
  -- Back after a long outage let its lease end: counted again, as a new one.
  redis.call('ZADD', KEYS[k + 2], 'NX', ARGV[2], ARGV[i])
end
return #ARGV - 2
