-- Admit one plan to late observation, or count it as dropped. Atomic, on Redis's clock (TIME).
-- KEYS[1] inflight ZSET (plan -> lease end, Redis ms)   KEYS[2] leases HASH (plan -> JSON)
-- KEYS[3] counters HASH                                 KEYS[4] the plan's publish_plan_post dedupe key
-- ARGV[1] plan_id  ARGV[2] MAX_WAIT_MS  ARGV[3] sweeper grace (ms)  ARGV[4] MAX_INFLIGHT
-- ARGV[5] symbol  ARGV[6] apply decision
-- Returns {'admitted'|'duplicate'|'dropped', published ms, deadline ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = now + tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('EXISTS', KEYS[4]) == 1 then
  return {'duplicate', tostring(now), tostring(deadline)}
end
-- Leases past their end hold no slot (a crashed worker cannot leak one); they
-- stay in the set as the sweeper's ledger until it records them.
if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') >= tonumber(ARGV[4]) then
  redis.call('HINCRBY', KEYS[3], 'dropped', 1)
  return {'dropped', tostring(now), tostring(deadline)}
end
redis.call('ZADD', KEYS[1], deadline + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({symbol = ARGV[5], apply_decision = ARGV[6],
                                                   published_ms = now, deadline_ms = deadline}))
return {'admitted', tostring(now), tostring(deadline)}
