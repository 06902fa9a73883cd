-- Shared by the observe steps (early, look, wake, finish, sweep, overdue). store.py loads each step as one
-- script: a generated table F of the names keys.py owns (counter fields, observation points, record paths),
-- then this file, then the step's own file, which lists its KEYS and named arguments at its top.
--
-- Redis does not roll a script back, so every step checks all that can fail before its first write, and the
-- first write of a record is its entry (XADD): a step that fails writes nothing, the plan stays leased and is
-- recorded, exactly once, when the cause is gone. Reads that check: the lease (HGET), the inflight set
-- (ZSCORE), the notes (HMGET), the counters and the heat-wait histogram (HMGET: the wrong type, or a value
-- that is not a number, fails there). After the entry only writes that cannot fail remain (HSET, SET, ZREM,
-- HDEL on keys already read), and under maxmemory Redis refuses only a script's first write.
-- Every time is Redis's own (TIME).

-- The step's arguments by name: ARGV holds name, value pairs (store.py builds them from keyword arguments;
-- lists and objects as JSON). arg(name) fails on a missing one, num(name) also on one that is not a number,
-- json(name) on one that is not JSON: all before any write.
local ARGS = {}
for i = 1, #ARGV, 2 do ARGS[ARGV[i]] = ARGV[i + 1] end
local function arg(name)
  local value = ARGS[name]
  if value == nil then error('observe step: missing argument ' .. name) end
  return value
end
local function num(name)
  local value = tonumber(arg(name))
  if not value then error('observe step: argument ' .. name .. ' is not a number') end
  return value
end
local function json(name) return cjson.decode(arg(name)) end

local t = redis.call('TIME')
local NOW = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local TS_EPOCH = string.format('%d.%03d', tonumber(t[1]), math.floor(tonumber(t[2]) / 1000))

local function field(...) return table.concat({...}, F.sep) end

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
local HEAT_FIELDS = {'ts_epoch', 'heat_level', 'heat_score', 'heat_action', 'out_action', 'recommended_partial',
                     'reason', 'mode', 'debug_json'}
local DEBUG_FIELDS = {'reason', 'mode', 'debug_json'}  -- HEAT_FIELDS[#COPIED + 1 ...]

local function unreadable(why)
  return {reason = 'parse_error', copied = {}, debug = {parse = why}}
end

-- Read a heat hash: nil when absent, else {reason = 'ok'|'parse_error', copied = {...}, debug = {...}}.
-- Found means the key exists (any field); only WRONGTYPE or an unreadable field the contract uses makes a
-- record unreadable. A debug field longer than the debug_json cap could never fit, so it is dropped unread.
local function read_heat(key, debug_cap)
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
  local debug = {}
  for i, name in ipairs(DEBUG_FIELDS) do
    local value = raw[#COPIED + i]
    if value and value ~= '' then
      if #value > debug_cap then debug.truncated = true
      elseif not utf8_ok(value) then return unreadable('heat hash is not UTF-8')
      else debug[name] = value end
    end
  end
  return {reason = 'ok', copied = copied, debug = debug}
end

-- debug_json: the caller's context plus what the step and the heat record say, at most cap characters.
local function debug_json(context, extra, heat_debug, cap)
  local ctx = cjson.decode(context)  -- the caller's JSON object
  for k, v in pairs(extra) do ctx[k] = v end
  for k, v in pairs(heat_debug or {}) do ctx[k] = v end
  local text = cjson.encode(ctx)
  for _, k in ipairs({'debug_json', 'mode', 'reason', 'parse', 'failed', 'cause'}) do
    if #text <= cap then return text end
    if ctx[k] ~= nil then
      ctx[k] = nil
      ctx.truncated = true
      text = cjson.encode(ctx)
    end
  end
  if #text <= cap then return text end
  if cap >= 18 then return '{"truncated":true}' end
  return '{}'
end

-- The stream entry's fields, in the contract's order, then the extra ones.
local function entry_fields(plan, symbol, obs_point, reason, copied, decision, debug, extra)
  local entry = {'ts_epoch', TS_EPOCH, 'plan_id', plan, 'symbol', symbol, 'apply_component', 'apply',
                 'obs_point', obs_point, 'heat_found', (reason == 'ok') and '1' or '0'}
  for _, pair in ipairs(COPIED) do
    entry[#entry + 1] = pair[1]
    entry[#entry + 1] = copied[pair[1]] or ''
  end
  for _, v in ipairs({'heat_reason', reason, 'apply_decision', decision, 'debug_json', debug}) do
    entry[#entry + 1] = v
  end
  for _, v in ipairs(extra) do entry[#entry + 1] = v end
  return entry
end

-- A hash's fields after the increments {{field, by, format}, ...}, as HSET arguments: read now (HMGET fails on
-- the wrong type; a value that is not a number fails here), written after the entry.
local function counts_after(key, increments)
  local names = {}
  for i, inc in ipairs(increments) do names[i] = inc[1] end
  local old = redis.call('HMGET', key, unpack(names))
  local out = {}
  for i, inc in ipairs(increments) do
    local value = 0
    if old[i] then
      value = tonumber(old[i])
      if not value then error(key .. ' field ' .. inc[1] .. ' is not a number') end
    end
    out[#out + 1] = inc[1]
    out[#out + 1] = string.format(inc[3] or '%d', value + inc[2])
  end
  return out
end

-- The counters of one entry: observed and reason by observation point.
local function entry_counts(obs_point, reason)
  local found = (reason == 'ok') and '1' or '0'
  return {{field(F.observed, obs_point, found), 1}, {field(F.reason, obs_point, reason), 1}}
end

-- The keys and settings of a publish_plan_post record, the same first six KEYS in every late step:
-- inflight ZSET (plan -> lease end ms), leases HASH (plan -> JSON), stream, counters HASH, heat-wait histogram
-- HASH, notes HASH (plan -> why its message was never sent; F.note_failed .. plan -> a step's last error).
local function late_recorder()
  return {inflight = KEYS[1], leases = KEYS[2], stream = KEYS[3], counters = KEYS[4], heat_wait = KEYS[5],
          notes = KEYS[6], ttl_s = num('ttl_s'), maxlen = num('maxlen'), debug_cap = num('debug_cap'),
          slack_ms = num('slack_ms'), buckets = arg('buckets'), context = arg('context')}
end

-- A plan's lease: nil when there is none, false when it is unreadable (not written by our admission), else a
-- table whose every field is safe to record (times finite and ordered; symbol and decision strings).
local function lease_of(R, plan)
  local raw = redis.call('HGET', R.leases, plan)
  if not raw then return nil end
  local ok, lease = pcall(cjson.decode, raw)
  if not ok or type(lease) ~= 'table' then return false end
  local published, deadline = tonumber(lease.published_ms), tonumber(lease.deadline_ms)
  if not published or not deadline or not (0 <= published and published <= deadline and deadline < 1e15) then
    return false
  end
  return {published_ms = published, deadline_ms = deadline,
          symbol = type(lease.symbol) == 'string' and lease.symbol or '',
          apply_decision = type(lease.apply_decision) == 'string' and lease.apply_decision or ''}
end

-- Free the slot of a lease nobody can record (unreadable, or an id our admission never writes).
local function free(R, plan)
  redis.call('ZREM', R.inflight, plan)
  redis.call('HDEL', R.leases, plan)
end

-- Record a leased plan's publish_plan_post outcome and remove its lease (the exactly-once step): every check
-- first, then the entry, then the counters, the dedupe key and the lease's removal.
local function record_late(R, plan, lease, dedupe_key, reason, heat, path, polls, extra)
  redis.call('ZSCORE', R.inflight, plan)  -- the inflight set's type, before any write
  local notes = redis.call('HMGET', R.notes, plan, F.note_failed .. plan)
  if notes[1] then extra.unsent = notes[1] end
  if notes[2] then extra.failed = notes[2] end
  local published, deadline = lease.published_ms, lease.deadline_ms
  local wait = NOW - published
  if reason == 'timeout' then
    -- The observation window, whenever the deciding look ran (a late look must not stretch it).
    wait = deadline - published
    if NOW > deadline then extra.late_ms = NOW - deadline end
  end
  if wait < 0 then wait = 0 end
  extra.wait_ms = wait
  extra.polls = polls
  extra.by = path
  local counts = entry_counts(F.obs_late, reason)
  counts[#counts + 1] = {field(F.recorded, path), 1}
  if path == F.path_sweep then counts[#counts + 1] = {F.recovered, 1} end
  counts = counts_after(R.counters, counts)
  local hist
  if reason == 'ok' then
    local bucket = F.hist_bucket .. '+Inf'
    for bound in string.gmatch(R.buckets, '%d+') do  -- ascending upper bounds (ms)
      if wait <= tonumber(bound) then bucket = F.hist_bucket .. bound; break end
    end
    hist = counts_after(R.heat_wait, {{bucket, 1}, {F.hist_count, 1}, {F.hist_sum, wait / 1000, '%.3f'}})
  end
  local debug = debug_json(R.context, extra, heat and heat.debug, R.debug_cap)
  local entry = entry_fields(plan, lease.symbol, F.obs_late, reason, heat and heat.copied or {},
                             lease.apply_decision, debug, {'wait_ms', string.format('%d', wait),
                             'polls', tostring(polls), 'recorded_by', path})
  redis.call('XADD', R.stream, 'MAXLEN', '~', R.maxlen, '*', unpack(entry))
  redis.call('HSET', R.counters, unpack(counts))
  if hist then redis.call('HSET', R.heat_wait, unpack(hist)) end
  -- Marks the plan recorded for admission, so a second observe_late is a duplicate within the TTL.
  redis.call('SET', dedupe_key, '1', 'EX', R.ttl_s)
  redis.call('ZREM', R.inflight, plan)
  redis.call('HDEL', R.leases, plan)
  if notes[1] or notes[2] then redis.call('HDEL', R.notes, plan, F.note_failed .. plan) end
  -- The outcome and the wait, for the plan's final state in Flower (worker/task_states.py).
  return {reason, string.format('%d', wait)}
end

-- Record a plan whose heat hash was seen (by a look or the wake step): ok or parse_error, unless it was seen
-- after deadline + slack, when it came too late: timeout, without copying it. Returns {reason, wait ms}.
local function record_heat(R, plan, lease, dedupe_key, heat, path, polls, extra)
  if NOW > lease.deadline_ms + R.slack_ms then
    extra.heat_after_deadline = true
    return record_late(R, plan, lease, dedupe_key, 'timeout', nil, path, polls, extra)
  end
  return record_late(R, plan, lease, dedupe_key, heat.reason, heat, path, polls, extra)
end

-- The text of an error caught by pcall (Redis errors are tables with an err field).
local function error_text(err)
  if type(err) == 'table' and err.err then return string.sub(err.err, 1, 200) end
  return string.sub(tostring(err), 1, 200)
end

