-- Admit one plan to late observation, or count it as dropped. Atomic.
-- KEYS[1] inflight ZSET (plan -> lease end, epoch ms)   KEYS[2] leases HASH (plan -> JSON payload)
-- KEYS[3] counters HASH                                 KEYS[4] the plan's publish_plan_post dedupe key
-- ARGV[1] plan_id  ARGV[2] now (ms)  ARGV[3] lease end (ms)  ARGV[4] MAX_INFLIGHT  ARGV[5] payload
-- Returns 'admitted', 'duplicate' or 'dropped'.
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('EXISTS', KEYS[4]) == 1 then
  return 'duplicate'
end
-- Leases past their end hold no slot (a crashed worker cannot leak one); they
-- stay in the set as the sweeper's ledger until it records them.
if redis.call('ZCOUNT', KEYS[1], '(' .. ARGV[2], '+inf') >= tonumber(ARGV[4]) then
  redis.call('HINCRBY', KEYS[3], 'dropped', 1)
  return 'dropped'
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[5])
return 'admitted'
