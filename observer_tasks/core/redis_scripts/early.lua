-- The early observer's step (create_apply_plan): read the plan's heat hash and record it, once per plan within
-- the dedupe TTL. The dedupe key is checked first and set last, so a failed step leaves nothing behind.
-- KEYS[1] the plan's heat hash  KEYS[2] its create_apply_plan dedupe key  KEYS[3] stream  KEYS[4] counters HASH
-- ARGV (by name): plan, symbol, decision, ttl_s, maxlen, debug_cap, context (JSON)
-- Returns the reason recorded, or 'duplicate'.
local heat_key, dedupe_key, stream, counters = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local plan, symbol, decision = arg('plan'), arg('symbol'), arg('decision')
local ttl_s, maxlen, debug_cap, context = num('ttl_s'), num('maxlen'), num('debug_cap'), arg('context')

if redis.call('EXISTS', dedupe_key) == 1 then return 'duplicate' end
local heat = read_heat(heat_key, debug_cap)
local reason = heat and heat.reason or 'missing'
local counts = counts_after(counters, entry_counts(F.obs_early, reason))
local entry = entry_fields(plan, symbol, F.obs_early, reason, heat and heat.copied or {}, decision,
                           debug_json(context, {}, heat and heat.debug, debug_cap), {})
redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(entry))
redis.call('HSET', counters, unpack(counts))
redis.call('SET', dedupe_key, '1', 'EX', ttl_s)
return reason
