-- agentwire: the kept events of one user with seqs ARGV[2]..ARGV[3], to fill a gap in
-- what pub/sub brought this node (docs/CLUSTER.md, "Order, duplicates and gaps"), read
-- only while the user's epoch is still ARGV[1] (checked in the same call: a history
-- that was lost and started again never fills a gap of the old one).
-- KEYS[1] meta hash (epoch, seq)   KEYS[2] stream (kept events, ids "<seq>-0")
-- ARGV[1] the epoch the node knows   ARGV[2] first seq   ARGV[3] last seq
-- ARGV[4] most entries returned
-- Returns {epoch or "", entries}: entries (oldest first, at most ARGV[4]) only when the
-- epoch is the one asked, else {}. The node checks they are exactly ARGV[2]..ARGV[3]
-- (events trimmed by MAXLEN or expired are missing: the gap is then reported).
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if epoch ~= ARGV[1] then
  return {epoch or '', {}}
end
return {epoch, redis.call('XRANGE', KEYS[2], ARGV[2] .. '-0', ARGV[3] .. '-0', 'COUNT', ARGV[4])}
