-- The wake step, for a batch of plans whose heat hash was just written (or every leased plan, on a resync):
-- record each plan still leased whose heat hash exists. A plan whose record fails is skipped and reported:
-- it wrote nothing and stays leased, and the others are recorded.
-- KEYS[1..6] the late record's keys: inflight ZSET, leases HASH, stream, counters HASH, heat-wait HASH,
--            notes HASH (see late_recorder in observe_lib.lua)
-- KEYS[5 + 2i], KEYS[6 + 2i] the heat hash and publish_plan_post dedupe key of plans[i]
-- ARGV (by name): plans (JSON), and the record's ttl_s, maxlen, debug_cap, slack_ms, buckets, context
-- Returns {{plan, reason, wait ms, ...} recorded, {plan, error, ...} skipped}.
local R = late_recorder()
local plans = json('plans')

local recorded, skipped = {}, {}
for i, plan in ipairs(plans) do
  local ok, result = pcall(function()
    local lease = lease_of(R, plan)
    if not lease then return nil end
    local heat = read_heat(KEYS[5 + 2 * i], R.debug_cap)
    if not heat then return nil end
    return record_heat(R, plan, lease, KEYS[6 + 2 * i], heat, F.path_wake, 0, {})
  end)
  if not ok then
    skipped[#skipped + 1] = plan
    skipped[#skipped + 1] = error_text(result)
  elseif result then
    recorded[#recorded + 1] = plan
    recorded[#recorded + 1] = result[1]
    recorded[#recorded + 1] = result[2]
  end
end
return {recorded, skipped}
