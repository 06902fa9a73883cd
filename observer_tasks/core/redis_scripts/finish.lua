-- Record an outcome decided outside Redis (the task's redis_error after two failed looks).
-- Returns {'recorded', reason, wait ms} | {'gone'} (no lease: someone else recorded it).
local lease = lease_of(K.lease)
if type(lease) ~= 'table' then return {'gone'} end
return atomically(function()
  local wait = math.max(0, math.min(now_ms(), lease.deadline_ms) - lease.published_ms)
  local outcome = record_late(K.lease, A.plan, lease, A.reason, wait, nil, C.path_look, A.polls, {errors = 2})
  flush_counts(K.counters)
  return {'recorded', outcome[1], outcome[2]}
end)
