-- Admit one plan to late observation, or count it as dropped. Atomic, on Redis's clock (TIME).
-- KEYS[1] inflight ZSET (plan -> lease end, Redis ms)   KEYS[2] leases HASH (plan -> JSON)
-- KEYS[3] counters HASH                                 KEYS[4] the plan's publish_plan_post dedupe key
-- ARGV[1] plan_id  ARGV[2] MAX_WAIT_MS  ARGV[3] sweeper grace (ms)  ARGV[4] MAX_INFLIGHT
-- ARGV[5] symbol  ARGV[6] apply decision
-- ARGV[7] how long ago the call was made (ms; > 0 when the producer's thread admits a call it deferred
--         while Redis was slow: the plan's publish time is then that much before Redis's TIME)
-- ARGV[8] the call's token: a retry of an admission whose reply was lost finds its own lease and is
--         'admitted' again (with the lease's times), not a 'duplicate' whose message is never sent
-- ARGV[9] the counters' field of dropped plans (keys.DROPPED)
-- Returns {'admitted'|'duplicate'|'dropped', published ms, deadline ms}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - (tonumber(ARGV[7]) or 0)
local deadline = now + tonumber(ARGV[2])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('EXISTS', KEYS[4]) == 1 then
  local raw = redis.call('HGET', KEYS[2], ARGV[1])
  if raw and ARGV[8] and ARGV[8] ~= '' then
    local ok, lease = pcall(cjson.decode, raw)
    if ok and type(lease) == 'table' and lease.token == ARGV[8] then
      return {'admitted', tostring(lease.published_ms), tostring(lease.deadline_ms)}
    end
  end
  return {'duplicate', tostring(now), tostring(deadline)}
end
-- Leases past their end hold no slot (a crashed worker cannot leak one); they
-- stay in the set as the sweeper's ledger until it records them.
if redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf') >= tonumber(ARGV[4]) then
  redis.call('HINCRBY', KEYS[3], ARGV[9], 1)
  return {'dropped', tostring(now), tostring(deadline)}
end
-- The lease's JSON first: the inflight set's type was checked by ZSCORE above, so a failure leaves nothing.
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode({symbol = ARGV[5], apply_decision = ARGV[6],
                                                   published_ms = now, deadline_ms = deadline,
                                                   token = ARGV[8] or ''}))
redis.call('ZADD', KEYS[1], deadline + tonumber(ARGV[3]), ARGV[1])
return {'admitted', tostring(now), tostring(deadline)}
