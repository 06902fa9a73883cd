-- The sweep step: record each given plan whose lease has ended (inflight score <= Redis TIME) as timeout, as
-- redis_error when the sweeper saw Redis unreachable during its wait, or as missing when its first message
-- never reached the broker (an unsent note), with the cause in debug_json, and
-- free the slot of a lease nobody can record (unreadable, or an id our admission never writes). A plan whose
-- record fails is skipped and reported: it wrote nothing, stays leased, and never blocks the others.
-- KEYS[1..6] the late record's keys: inflight ZSET, leases HASH, stream, counters HASH, heat-wait HASH,
--            notes HASH (see late_recorder in observe_lib.lua)
-- KEYS[6 + i] the publish_plan_post dedupe key of plans[i]
-- ARGV (by name, lists as JSON): plans, foreign (overdue ids that are not plan ids: freed), outages
--   ({start, end} Redis ms, as the sweeper saw them), and the record's ttl_s, maxlen, debug_cap, slack_ms,
--   buckets, context
-- Returns {now ms, recorded count, {freed plan, ...}, {skipped plan, error, ...}, {plan, reason, wait ms, ...}}.
local R = late_recorder()
local plans, foreign, outages = json('plans'), json('foreign'), json('outages')

local function overdue(plan)
  local score = redis.call('ZSCORE', R.inflight, plan)
  return score and tonumber(score) <= NOW
end

local recorded, freed, skipped, outcomes = 0, {}, {}, {}
for _, plan in ipairs(foreign) do
  if overdue(plan) then free(R, plan); freed[#freed + 1] = plan end
end
for i, plan in ipairs(plans) do
  local ok, result = pcall(function()
    if not overdue(plan) then return nil end  -- recorded meanwhile by a look, the wake step or another sweeper
    local lease = lease_of(R, plan)
    if not lease then free(R, plan); return 'freed' end
    local reason, cause = 'timeout', 'no observation by deadline + grace (message lost or worker stopped)'
    if redis.call('HEXISTS', R.notes, plan) == 1 then
      -- Its first message never reached the broker (the publisher noted why): a broker outage, not a slow
      -- HeatBridge. 'missing' (nothing was looked at) keeps it out of the timing alert's timeouts.
      reason, cause = 'missing', 'first message never reached the broker'
    else
      for _, outage in ipairs(outages) do
        if outage[1] <= lease.deadline_ms and outage[2] >= lease.published_ms then
          reason, cause = 'redis_error', cause .. '; Redis was unreachable during the wait'
          break
        end
      end
    end
    local outcome = record_late(R, plan, lease, KEYS[6 + i], reason, nil, F.path_sweep, 0,
                                {cause = cause, swept = true})
    outcomes[#outcomes + 1] = plan
    outcomes[#outcomes + 1] = outcome[1]
    outcomes[#outcomes + 1] = outcome[2]
    return 'recorded'
  end)
  if not ok then
    skipped[#skipped + 1] = plan
    skipped[#skipped + 1] = error_text(result)
  elseif result == 'recorded' then
    recorded = recorded + 1
  elseif result == 'freed' then
    freed[#freed + 1] = plan
  end
end
return {string.format('%d', NOW), recorded, freed, skipped, outcomes}
