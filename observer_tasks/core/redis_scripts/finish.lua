-- Record a publish_plan_post outcome decided outside Redis (the task's redis_error after two failed looks).
-- KEYS[1..6] the late record's keys: inflight ZSET, leases HASH, stream, counters HASH, heat-wait HASH,
--            notes HASH (see late_recorder in observe_lib.lua)
-- KEYS[7] the plan's publish_plan_post dedupe key
-- ARGV (by name): plan, reason, path, polls, and the record's ttl_s, maxlen, debug_cap, slack_ms, buckets,
--                 context
-- Returns {'recorded', reason, wait ms} | {'gone'} (no lease: someone else recorded it).
local R = late_recorder()
local dedupe_key = KEYS[7]
local plan, reason, path, polls = arg('plan'), arg('reason'), arg('path'), num('polls')

local lease = lease_of(R, plan)
if not lease then return {'gone'} end
return {'recorded', unpack(record_late(R, plan, lease, dedupe_key, reason, nil, path, polls, {}))}
