-- One look of the late task at a leased plan: record its publish_plan_post entry if its heat hash is there or
-- its deadline has passed; otherwise say how long is left and whether the wake path is healthy.
-- KEYS[1..6] the late record's keys: inflight ZSET, leases HASH, stream, counters HASH, heat-wait HASH,
--            notes HASH (see late_recorder in observe_lib.lua)
-- KEYS[7] wake_ok  KEYS[8] wake_degraded  KEYS[9] the plan's heat hash  KEYS[10] its publish_plan_post dedupe key
-- ARGV (by name): plan, polls, errors (failed looks before), message_deadline_ms (the message's deadline, Redis
--                 ms), and the record's ttl_s, maxlen, debug_cap, slack_ms, buckets, context
-- Returns {'recorded', reason, wait ms} | {'gone'} (no lease) | {'lost'} (no lease and no record for a young message)
--         | {'pending', now ms, deadline ms, wake healthy 1|0}.
local R = late_recorder()
local wake_ok, wake_degraded, heat_key, dedupe_key = KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local plan, polls, errors, message_deadline = arg('plan'), num('polls'), num('errors'), num('message_deadline_ms')

local lease = lease_of(R, plan)
if not lease then
  -- No lease and no record while the message is still young enough that a record's dedupe key would be
  -- there: the admission vanished (a failover to a replica that never received it). Counted, once: the
  -- counter is read before the dedupe key is set.
  if NOW <= message_deadline + 1000 * R.ttl_s and redis.call('EXISTS', dedupe_key) == 0 then
    local counts = counts_after(R.counters, {{F.lost, 1}})
    redis.call('SET', dedupe_key, 'lost', 'EX', R.ttl_s)
    redis.call('HSET', R.counters, unpack(counts))
    return {'lost'}
  end
  return {'gone'}
end
local extra = {}
if errors > 0 then extra.errors = errors end
local heat = read_heat(heat_key, R.debug_cap)
if heat then
  return {'recorded', unpack(record_heat(R, plan, lease, dedupe_key, heat, F.path_look, polls, extra))}
end
if NOW >= lease.deadline_ms then
  return {'recorded', unpack(record_late(R, plan, lease, dedupe_key, 'timeout', nil, F.path_look, polls, extra))}
end
local healthy = redis.call('EXISTS', wake_ok) == 1 and redis.call('EXISTS', wake_degraded) == 0
return {'pending', string.format('%d', NOW), string.format('%d', lease.deadline_ms), healthy and 1 or 0}
