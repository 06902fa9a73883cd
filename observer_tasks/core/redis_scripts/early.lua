-- The early observer's step, at any configured observation point (create_apply_plan, reconcile_close_consume
-- ...): read the plan's heat hash and record it, once per plan and point within the dedupe TTL (the dedupe key
-- is checked first and set with the entry, so a failed step leaves nothing behind). A `stale` call (the apply
-- layer could make it only long after plan creation: Redis was unreachable) records redis_error: the look at
-- plan creation could not happen, and heat read now would say nothing about then.
-- Returns the reason recorded, or 'duplicate'.
if redis.call('EXISTS', K.dedupe) == 1 then return 'duplicate' end
return atomically(function()
  local heat, extra, reason = nil, {}, C.redis_error
  if A.stale == 1 then
    extra.cause = 'the apply layer could not reach Redis at plan creation'
  else
    heat = read_heat(K.heat, A.debug_cap, false)
    reason = heat and heat.reason or C.missing
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
