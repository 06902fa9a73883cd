-- Record one observation: dedupe, stream entry, counters, lease release. Atomic.
-- KEYS[1] dedupe key  KEYS[2] stream  KEYS[3] counters HASH  KEYS[4] inflight ZSET
-- KEYS[5] leases HASH  KEYS[6] heat-wait histogram HASH
-- ARGV[1] plan_id  ARGV[2] dedupe TTL (s)  ARGV[3] stream MAXLEN  ARGV[4] '1' to release the late lease
-- ARGV[5] counter fields to increment by one, separated by spaces
-- ARGV[6] heat-wait histogram bucket field or ''  ARGV[7] heat wait (s) added to the histogram sum
-- ARGV[8..] stream entry field/value pairs, in order
-- Returns the stream entry id, or false when this plan and point were already recorded.
local plan = ARGV[1]
-- Release the lease even for a duplicate attempt, so a second run frees it too.
if ARGV[4] == '1' then
  redis.call('ZREM', KEYS[4], plan)
  redis.call('HDEL', KEYS[5], plan)
end
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[2]) then
  return false
end
local entry = {}
for i = 8, #ARGV do
  entry[#entry + 1] = ARGV[i]
end
local id = redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', unpack(entry))
for counter in string.gmatch(ARGV[5], '%S+') do
  redis.call('HINCRBY', KEYS[3], counter, 1)
end
if ARGV[6] ~= '' then
  redis.call('HINCRBY', KEYS[6], ARGV[6], 1)
  redis.call('HINCRBY', KEYS[6], 'count', 1)
  redis.call('HINCRBYFLOAT', KEYS[6], 'sum', ARGV[7])
end
return id
