-- One look of the late task at a plan: record its publish_plan_post entry if its heat hash is there or its
-- deadline has passed; otherwise say how long is left and whether the wake path is healthy. Besides the gaps
-- the workers recorded, the window was not watched if this chain's looks failed (`errors` > 0) or this worker
-- has not reached Redis promptly since `unwatched_since_ms` (a gap its heartbeat has yet to record).
-- Returns {'recorded', reason, wait ms} | {'gone'} (recorded by someone else) | {'lost'} (no lease and no
-- record for a young message: its admission vanished; counted once) | {'pending', now, deadline, healthy 1|0}.
local lease = lease_of(K.lease)
if lease == nil then
  if now_ms() <= A.message_deadline_ms + 1000 * A.ttl_s then
    return atomically(function()
      redis.call('SET', K.lease, C.lost_marker, 'EX', A.ttl_s)
      UNDO[#UNDO + 1] = function() redis.call('DEL', K.lease) end
      count(C.lost, 1)
      flush_counts(K.counters)
      return {'lost'}
    end)
  end
  return {'gone'}
end
if type(lease) ~= 'table' then return {'gone'} end
local heat = read_heat(K.heat, A.debug_cap, false)
if heat or now_ms() >= lease.deadline_ms then
  return atomically(function()
    local extra = {}
    if A.errors > 0 then extra.errors = A.errors end
    local function gaps()
      local list = gaps_after(K.gaps, lease.published_ms)
      if A.unwatched_since_ms > 0 then list[#list + 1] = {A.unwatched_since_ms, now_ms()} end
      if A.errors > 0 then list[#list + 1] = {lease.published_ms, now_ms()} end
      return list
    end
    local reason, wait = late_reason(lease, heat, gaps, nil, extra)
    local outcome = record_late(K.lease, A.plan, lease, reason, wait, heat, C.path_look, A.polls, extra)
    flush_counts(K.counters)
    return {'recorded', outcome[1], outcome[2]}
  end)
end
local healthy = redis.call('EXISTS', K.wake)
return {'pending', string.format('%d', now_ms()), string.format('%d', lease.deadline_ms), tostring(healthy)}
