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
-- recent plans again after a failover) finds its own lease: 'kept', with the lease's times; or, if that attempt
-- was refused (dropped, backlog), the refusal marker it left (C.refused_marker|status|token, EX the dedupe
-- TTL): the same status, counted once. Another call's refusal marker does not stop a plan.
-- Returns {status, published ms, deadline ms[, reason]}: admitted | kept | recorded | duplicate | dropped | backlog.
local published = now_ms() - A.age_ms
local deadline = published + A.max_wait_ms
local lease_end = deadline + A.grace_ms
local value = lease_value({published_ms = published, deadline_ms = deadline, end_ms = lease_end, token = A.token,
                           symbol = A.symbol, decision = A.decision})
local times = {string.format('%d', published), string.format('%d', deadline)}

local refusal = C.refused_marker .. C.lease_sep
local previous = nil
if not redis.call('SET', K.lease, value, 'NX') then
  local raw = redis.pcall('GET', K.lease)
  local refused = type(raw) == 'string' and string.sub(raw, 1, #refusal) == refusal
  if refused and A.token ~= '' and string.sub(raw, -#A.token - 1) == C.lease_sep .. A.token then
    return {string.match(string.sub(raw, #refusal + 1), '^([^' .. C.lease_sep .. ']+)'), times[1], times[2]}
  end
  if refused then
    previous = raw  -- another call for this plan was refused: this one is tried
    redis.call('SET', K.lease, value)
  elseif raw ~= C.lost_marker then
    local lease = lease_of(K.lease)
    if type(lease) == 'table' and A.token ~= '' and lease.token == A.token then
      return {'kept', string.format('%d', lease.published_ms), string.format('%d', lease.deadline_ms)}
    end
    return {'duplicate', times[1], times[2]}
  else
    -- Its earlier admission vanished (a failover to a replica that never had it): admitted again.
    previous = C.lost_marker
    redis.call('SET', K.lease, value)
  end
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
      -- A call held by the apply layer (age_ms > 0): nobody watched its window from its publish time until now.
      reason, wait = late_reason(lease, heat, function()
        local list = gaps_after(K.gaps, published)
        if A.age_ms > 0 then list[#list + 1] = {published, now_ms()} end
        return list
      end, nil, extra)
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
      if A.token ~= '' then redis.call('SET', K.lease, refusal .. status .. C.lease_sep .. A.token, 'EX', A.ttl_s) end
      return {status, times[1], times[2]}
    end
  end
  redis.call('ZADD', K.inflight, lease_end, A.plan)
  return {'admitted', times[1], times[2]}
end)
