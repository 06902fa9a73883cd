-- Admit one plan to late observation, on Redis's clock. The lease (the plan's publish_plan_post dedupe key)
-- is written first, SET NX: that is also the duplicate check. Then, in order:
--   heat already written (before the call, so no push will announce it) -> record the plan now, `ok`;
--   a call the apply layer deferred past its whole window (Redis unreachable) -> record it now, `redis_error`
--   unless the heat proves `ok`;
--   MAX_INFLIGHT live leases -> dropped (counted); MAX_INFLIGHT more waiting past their lease for a worker
--   -> backlog (counted as a refusal);
--   otherwise the plan joins the ledger (inflight, scored by its lease end).
-- `age_ms` > 0 for a call admitted late by the apply layer's outbox: its publish time is that much earlier.
-- A call made again with the same `token` (its first attempt's reply was lost, or the apply process admits its
-- recent plans again after a failover) finds its own lease: 'kept', with the lease's times.
-- Returns {status, published ms, deadline ms[, reason]}: admitted | kept | recorded | duplicate | dropped | backlog.
local published = now_ms() - A.age_ms
local deadline = published + A.max_wait_ms
local lease_end = deadline + A.grace_ms
local value = lease_value({published_ms = published, deadline_ms = deadline, end_ms = lease_end, token = A.token,
                           symbol = A.symbol, decision = A.decision})
local times = {string.format('%d', published), string.format('%d', deadline)}

local previous = nil
if not redis.call('SET', K.lease, value, 'NX') then
  if redis.pcall('GET', K.lease) ~= C.lost_marker then
    local lease = lease_of(K.lease)
    if type(lease) == 'table' and A.token ~= '' and lease.token == A.token then
      return {'kept', string.format('%d', lease.published_ms), string.format('%d', lease.deadline_ms)}
    end
    return {'duplicate', times[1], times[2]}
  end
  -- Its earlier admission vanished (a failover to a replica that never had it): admitted again.
  previous = C.lost_marker
  redis.call('SET', K.lease, value)
end

return atomically(function()
  if previous then UNDO[#UNDO + 1] = function() redis.call('SET', K.lease, previous, 'EX', A.ttl_s) end
  else UNDO[#UNDO + 1] = function() redis.call('DEL', K.lease) end end
  local lease = {published_ms = published, deadline_ms = deadline, symbol = A.symbol, decision = A.decision,
                 raw = previous}
  local heat = read_heat(K.heat, A.debug_cap, false)
  if heat or now_ms() >= deadline then
    local extra = {}
    if A.age_ms > 0 then extra.deferred_ms = A.age_ms end
    local reason, wait
    if not heat and now_ms() >= deadline then
      extra.cause = 'the apply layer could not reach Redis for the whole window'
      reason, wait = C.redis_error, deadline - published
    else
      reason, wait = late_reason(lease, heat, function() return gaps_after(K.gaps, published) end, nil, extra)
    end
    local outcome = record_late(K.lease, A.plan, lease, reason, wait, heat, C.path_admit, 0, extra)
    flush_counts(K.counters)
    return {'recorded', times[1], times[2], outcome[1]}
  end
  local held = redis.call('ZCARD', K.inflight)
  if held >= A.max_inflight then
    local live = redis.call('ZCOUNT', K.inflight, '(' .. string.format('%d', now_ms()), '+inf')
    local status = nil
    if live >= A.max_inflight then status = 'dropped'
    elseif held - live >= A.backlog_max then status = 'backlog' end
    if status then
      undo_to(0)
      redis.call('HINCRBY', K.counters,
                 status == 'dropped' and C.dropped or field(C.refused, C.late_point, 'backlog'), 1)
      return {status, times[1], times[2]}
    end
  end
  redis.call('ZADD', K.inflight, lease_end, A.plan)
  return {'admitted', times[1], times[2]}
end)
