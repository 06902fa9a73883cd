-- The early observer's step, at any configured observation point (create_apply_plan, reconcile_close_consume
-- ...): read the plan's heat hash and record it, once per plan and point within the dedupe TTL (the dedupe key
-- is checked first and set with the entry, so a failed step leaves nothing behind).
-- A call the apply layer's outbox makes late (A.context.deferred_ms: Redis was slow or away at the call) looks
-- at the heat as it was at the call: heat stamped (ts_epoch, HeatBridge's Redis time) after the call was not
-- visible then, so it is `missing`; a `stale` call (later than the ride-out) whose heat does not prove it was
-- there is `redis_error`: its look at plan creation could not happen.
-- Returns the reason recorded, or 'duplicate'.
if redis.call('EXISTS', K.dedupe) == 1 then return 'duplicate' end
return atomically(function()
  local extra, deferred = {}, tonumber(A.context.deferred_ms) or 0
  local heat = read_heat(K.heat, A.debug_cap, false)
  if heat and heat.reason == C.ok and deferred > 0 then
    local ts = tonumber(heat.copied.heat_ts_epoch or '')
    if ts and ts * 1000 > now_ms() - deferred then
      heat, extra.heat_after_call = nil, true
    end
  end
  local reason = heat and heat.reason or C.missing
  if not heat and A.stale == 1 then
    reason, extra.cause = C.redis_error, 'the apply layer could not reach Redis at plan creation'
  end
  add_entry(K.stream, A.maxlen, {plan = A.plan, symbol = A.symbol, point = A.obs_point, reason = reason,
            copied = heat and heat.copied or {}, decision = A.decision,
            debug = debug_json(A.context, extra, heat and heat.debug, A.debug_cap)})
  redis.call('SET', K.dedupe, '1', 'EX', A.ttl_s)
  UNDO[#UNDO + 1] = function() redis.call('DEL', K.dedupe) end
  count(field(C.reason, A.obs_point, reason), 1)
  flush_counts(K.counters)
  return reason
end)
