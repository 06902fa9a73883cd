-- Every observation is written here, in one atomic step, on Redis's own clock (TIME).
-- Modes (ARGV[1]):
--   early   the early observer: dedupe (SET NX EX), read the heat hash, record create_apply_plan
--   look    one look of the late task: record publish_plan_post if heat is there or the deadline passed
--   wake    the wake step: for each pushed plan still leased, record it if its heat hash is readable
--   finish  record a publish_plan_post outcome decided outside (the task's redis_error)
--   sweep   record every lease past its end (deadline + grace) as timeout, redis_error in an outage, or
--           missing when its first message never reached the broker (an unsent note)
-- A publish_plan_post entry is written only by the call that removes the plan's lease: the lease is the
-- exactly-once token, whatever the dedupe TTL.
--
-- KEYS[1] inflight ZSET (plan -> lease end ms)  KEYS[2] leases HASH (plan -> JSON)  KEYS[3] stream
-- KEYS[4] counters HASH  KEYS[5] heat-wait histogram HASH  KEYS[6] unsent HASH (plan -> cause)
-- KEYS[7] wake_ok  KEYS[8] wake_degraded  KEYS[9], KEYS[10], ...: heat key and dedupe key of each plan
-- ARGV[2] dedupe TTL (s)  ARGV[3] stream MAXLEN  ARGV[4] debug_json cap (characters)
-- ARGV[5] slack (ms): heat seen later than deadline + slack is a timeout
-- ARGV[6] histogram bounds (ms, ascending, space separated)  ARGV[7] context JSON for debug_json
-- ARGV[8], ARGV[9]: early: symbol, decision | look: polls, errors | finish: reason, path
--                   sweep: outage windows 'start end ...' (Redis ms), dedupe key prefix
-- ARGV[10..] plan ids (one per heat/dedupe key pair); look: ARGV[11] the message's deadline (Redis ms)
-- Replies: look {'gone'} | {'pending', now, deadline, wake healthy} | {'recorded', reason, wait ms};
-- finish {'gone'} | {'recorded', reason, wait ms}; wake {plan, reason, wait ms, ...} of the plans it recorded;
-- sweep {now, recorded, freed, leases read, plan, reason, wait ms, ...}; early: the reason or 'duplicate'.

local mode = ARGV[1]
local LATE = 'publish_plan_post'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ts_epoch = string.format('%d.%03d', tonumber(t[1]), math.floor(tonumber(t[2]) / 1000))

local LEVELS = {cold = true, warm = true, hot = true, unknown = true}
local ACTIONS = {NONE = true, DOWNGRADE_FULL_TO_PARTIAL = true, HOLD_CLOSE = true}
-- Stream field -> heat hash field, in the contract's order.
local COPIED = {{'heat_ts_epoch', 'ts_epoch'}, {'heat_level', 'heat_level'}, {'heat_score', 'heat_score'},
                {'heat_action', 'heat_action'}, {'heat_out_action', 'out_action'},
                {'heat_recommended_partial', 'recommended_partial'}}
local MAX_COPIED = 64

-- Well-formed UTF-8 sequences, as strict as Python's decoder (no overlong forms, surrogates or code points
-- above U+10FFFF). Lead bytes never occur as continuation bytes, so each match is a whole sequence.
local UTF8_SEQUENCES = {
  '[\194-\223][\128-\191]',
  '\224[\160-\191][\128-\191]', '[\225-\236\238\239][\128-\191][\128-\191]', '\237[\128-\159][\128-\191]',
  '\240[\144-\191][\128-\191][\128-\191]', '[\241-\243][\128-\191][\128-\191][\128-\191]',
  '\244[\128-\143][\128-\191][\128-\191]',
}

-- Each well-formed sequence is replaced by an ASCII byte (in C, by gsub: no byte loop in Lua); any byte
-- >= 0x80 left over is malformed. Replacing, not removing, keeps fragments from joining into a sequence.
local function utf8_ok(s)
  if not string.find(s, '[\128-\255]') then return true end
  for _, pattern in ipairs(UTF8_SEQUENCES) do s = string.gsub(s, pattern, '.') end
  return not string.find(s, '[\128-\255]')
end

local function problem(name, value)
  if #value > MAX_COPIED then return 'longer than ' .. MAX_COPIED .. ' characters' end
  if value == '' then return nil end
  if name == 'heat_level' and not LEVELS[value] then return 'unknown level ' .. value end
  if name == 'heat_action' and not ACTIONS[value] then return 'unknown action ' .. value end
  if name == 'ts_epoch' or name == 'heat_score' then
    local n = tonumber(value)
    if not n or string.find(value, '[xX]') then return 'not a number' end
    if n ~= n or n == math.huge or n == -math.huge then return 'not a finite number' end
  end
  return nil
end

-- The heat hash's fields the contract uses (read with HMGET: whatever else HeatBridge keeps there is never
-- read), the copied ones first, then the ones that go into debug_json.
local HEAT_FIELDS = {}
for i, pair in ipairs(COPIED) do HEAT_FIELDS[i] = pair[2] end
local DEBUG_FIELDS = {'reason', 'mode', 'debug_json'}
for _, name in ipairs(DEBUG_FIELDS) do HEAT_FIELDS[#HEAT_FIELDS + 1] = name end

local function unreadable(why)
  return {reason = 'parse_error', copied = {}, debug = {parse = why}}
end

-- Read a heat hash: nil when absent, else {reason = 'ok'|'parse_error', copied = {...}, debug = {...}}.
-- Found means the key exists (any field); only WRONGTYPE or an unreadable field the contract uses makes a
-- record unreadable. A debug field longer than the debug_json cap could never fit, so it is dropped unread.
local function read_heat(key)
  if redis.call('EXISTS', key) == 0 then return nil end
  local raw = redis.pcall('HMGET', key, unpack(HEAT_FIELDS))
  if raw.err then return unreadable(string.sub(raw.err, 1, 80)) end
  local copied = {}
  for i, pair in ipairs(COPIED) do
    local value = raw[i] or ''
    if #value <= MAX_COPIED and not utf8_ok(value) then return unreadable('heat hash is not UTF-8') end
    local why = problem(pair[2], value)
    if why then return unreadable(pair[2] .. ': ' .. why) end
    copied[pair[1]] = value
  end
  local debug, limit = {}, tonumber(ARGV[4])
  for i, name in ipairs(DEBUG_FIELDS) do
    local value = raw[#COPIED + i]
    if value and value ~= '' then
      if #value > limit then debug.truncated = true
      elseif not utf8_ok(value) then return unreadable('heat hash is not UTF-8')
      else debug[name] = value end
    end
  end
  return {reason = 'ok', copied = copied, debug = debug}
end

-- debug_json: the caller's context plus what the heat record says, at most ARGV[4] characters.
local function debug_json(extra, heat_debug)
  local ctx = cjson.decode(ARGV[7])
  for k, v in pairs(extra) do ctx[k] = v end
  for k, v in pairs(heat_debug or {}) do ctx[k] = v end
  local limit = tonumber(ARGV[4])
  local text = cjson.encode(ctx)
  for _, k in ipairs({'debug_json', 'mode', 'reason', 'parse', 'cause'}) do
    if #text <= limit then return text end
    if ctx[k] ~= nil then
      ctx[k] = nil
      ctx.truncated = true
      text = cjson.encode(ctx)
    end
  end
  if #text <= limit then return text end
  if limit >= 18 then return '{"truncated":true}' end
  return '{}'
end

local function write_entry(plan, symbol, obs_point, reason, copied, decision, debug, extra)
  local found = (reason == 'ok') and '1' or '0'
  local entry = {'ts_epoch', ts_epoch, 'plan_id', plan, 'symbol', symbol, 'apply_component', 'apply',
                 'obs_point', obs_point, 'heat_found', found}
  for _, pair in ipairs(COPIED) do
    entry[#entry + 1] = pair[1]
    entry[#entry + 1] = copied[pair[1]] or ''
  end
  for _, v in ipairs({'heat_reason', reason, 'apply_decision', decision, 'debug_json', debug}) do
    entry[#entry + 1] = v
  end
  for _, v in ipairs(extra) do entry[#entry + 1] = v end
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[3], '*', unpack(entry))
  redis.call('HINCRBY', KEYS[4], 'observed|' .. obs_point .. '|' .. found, 1)
  redis.call('HINCRBY', KEYS[4], 'reason|' .. obs_point .. '|' .. reason, 1)
end

-- Record a leased plan's publish_plan_post outcome and remove its lease (the exactly-once step).
local function record_late(plan, lease, dedupe_key, reason, heat, path, polls, extra_debug)
  redis.call('ZREM', KEYS[1], plan)
  redis.call('HDEL', KEYS[2], plan)
  local unsent = redis.call('HGET', KEYS[6], plan)
  if unsent then
    redis.call('HDEL', KEYS[6], plan)
    extra_debug.unsent = unsent
  end
  -- Marks the plan recorded for admission, so a second observe_late is a duplicate within the TTL.
  redis.call('SET', dedupe_key, '1', 'EX', ARGV[2])
  local published, deadline = tonumber(lease.published_ms), tonumber(lease.deadline_ms)
  local wait = now - published
  if reason == 'timeout' then
    -- The observation window, whenever the deciding look ran (a late look must not stretch it).
    wait = deadline - published
    if now > deadline then extra_debug.late_ms = now - deadline end
  end
  if wait < 0 then wait = 0 end
  extra_debug.wait_ms = wait
  extra_debug.polls = polls
  extra_debug.by = path
  local debug = debug_json(extra_debug, heat and heat.debug)
  write_entry(plan, lease.symbol, LATE, reason, heat and heat.copied or {}, lease.apply_decision, debug,
              {'wait_ms', tostring(wait), 'polls', tostring(polls), 'recorded_by', path})
  redis.call('HINCRBY', KEYS[4], 'recorded|' .. path, 1)
  if path == 'sweep' then redis.call('HINCRBY', KEYS[4], 'recovered', 1) end
  if reason == 'ok' then
    local bucket = 'le:+Inf'
    for bound in string.gmatch(ARGV[6], '%d+') do
      if wait <= tonumber(bound) then bucket = 'le:' .. bound; break end
    end
    redis.call('HINCRBY', KEYS[5], bucket, 1)
    redis.call('HINCRBY', KEYS[5], 'count', 1)
    redis.call('HINCRBYFLOAT', KEYS[5], 'sum', string.format('%.3f', wait / 1000))
  end
  -- The outcome and the wait, for the plan's final state in Flower (worker/task_states.py).
  return {reason, tostring(wait)}
end

local function lease_of(plan)
  local raw = redis.call('HGET', KEYS[2], plan)
  if not raw then return nil end
  local ok, lease = pcall(cjson.decode, raw)
  if not ok or type(lease) ~= 'table' or not tonumber(lease.published_ms) or not tonumber(lease.deadline_ms) then
    return false
  end
  return lease
end

-- Record a plan whose heat hash was seen (by a look or the wake step): ok or parse_error, unless it was seen
-- after deadline + slack, when it came too late: timeout, without copying it. Returns {reason, wait ms}.
local function record_heat(plan, lease, dedupe_key, heat, path, polls, extra)
  if now > tonumber(lease.deadline_ms) + tonumber(ARGV[5]) then
    extra.heat_after_deadline = true
    return record_late(plan, lease, dedupe_key, 'timeout', nil, path, polls, extra)
  end
  return record_late(plan, lease, dedupe_key, heat.reason, heat, path, polls, extra)
end

if mode == 'early' then
  if not redis.call('SET', KEYS[10], '1', 'NX', 'EX', ARGV[2]) then return 'duplicate' end
  local heat = read_heat(KEYS[9])
  local reason = heat and heat.reason or 'missing'
  write_entry(ARGV[10], ARGV[8], 'create_apply_plan', reason, heat and heat.copied or {}, ARGV[9],
              debug_json({}, heat and heat.debug), {})
  return reason
end

if mode == 'look' then
  local plan = ARGV[10]
  local lease = lease_of(plan)
  if not lease then
    -- No lease and no record while the message is still young enough that a record's dedupe key would be
    -- there: the admission vanished (a failover to a replica that never received it). Counted, once.
    local young = now <= (tonumber(ARGV[11]) or 0) + 1000 * tonumber(ARGV[2])
    if young and redis.call('SET', KEYS[10], 'lost', 'NX', 'EX', ARGV[2]) then
      redis.call('HINCRBY', KEYS[4], 'lost', 1)
      return {'lost'}
    end
    return {'gone'}
  end
  local polls = tonumber(ARGV[8])
  local extra = {}
  if tonumber(ARGV[9]) > 0 then extra.errors = tonumber(ARGV[9]) end
  local heat = read_heat(KEYS[9])
  if heat then
    return {'recorded', unpack(record_heat(plan, lease, KEYS[10], heat, 'look', polls, extra))}
  end
  if now >= tonumber(lease.deadline_ms) then
    return {'recorded', unpack(record_late(plan, lease, KEYS[10], 'timeout', nil, 'look', polls, extra))}
  end
  local healthy = redis.call('EXISTS', KEYS[7]) == 1 and redis.call('EXISTS', KEYS[8]) == 0
  return {'pending', tostring(now), tostring(lease.deadline_ms), healthy and 1 or 0}
end

if mode == 'wake' then
  local out = {}
  for i = 10, #ARGV do
    local plan = ARGV[i]
    local lease = lease_of(plan)
    if lease then
      local heat = read_heat(KEYS[9 + 2 * (i - 10)])
      if heat then
        local outcome = record_heat(plan, lease, KEYS[10 + 2 * (i - 10)], heat, 'wake', 0, {})
        out[#out + 1] = plan
        out[#out + 1] = outcome[1]
        out[#out + 1] = outcome[2]
      end
    end
  end
  return out
end

if mode == 'finish' then
  local plan = ARGV[10]
  local lease = lease_of(plan)
  if not lease then return {'gone'} end
  local polls = tonumber(cjson.decode(ARGV[7]).polls) or 0
  return {'recorded', unpack(record_late(plan, lease, KEYS[10], ARGV[8], nil, ARGV[9], polls, {}))}
end

if mode == 'sweep' then
  local outages = {}
  for n in string.gmatch(ARGV[8], '%d+') do outages[#outages + 1] = tonumber(n) end
  local plans = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 200)
  local recorded, freed, outcomes = 0, 0, {}
  for _, plan in ipairs(plans) do
    local lease = lease_of(plan)
    if not lease then
      -- Not written by our admission: nothing to record, just free the slot.
      redis.call('ZREM', KEYS[1], plan)
      redis.call('HDEL', KEYS[2], plan)
      freed = freed + 1
    else
      local reason, cause = 'timeout', 'no observation by deadline + grace (message lost or worker stopped)'
      if redis.call('HEXISTS', KEYS[6], plan) == 1 then
        -- Its first message never reached the broker (the publisher noted why): a broker outage, not a slow
        -- HeatBridge. 'missing' (nothing was looked at) keeps it out of the timing alert's timeouts.
        reason, cause = 'missing', 'first message never reached the broker'
      else
        for j = 1, #outages, 2 do
          if outages[j] <= tonumber(lease.deadline_ms) and outages[j + 1] >= tonumber(lease.published_ms) then
            reason, cause = 'redis_error', cause .. '; Redis was unreachable during the wait'
            break
          end
        end
      end
      local outcome = record_late(plan, lease, ARGV[9] .. plan, reason, nil, 'sweep', 0, {cause = cause, swept = true})
      outcomes[#outcomes + 1] = plan
      outcomes[#outcomes + 1] = outcome[1]
      outcomes[#outcomes + 1] = outcome[2]
      recorded = recorded + 1
    end
  end
  return {tostring(now), recorded, freed, #plans, unpack(outcomes)}
end

return redis.error_reply('observe.lua: unknown mode ' .. tostring(mode))
