-- Shared by the observe steps. Each step is loaded as: the prologue steps.py generates from its declaration
-- (C: the contract's names; K: its keys by name; A: its arguments by name; ITEMS: a batch's plans; now_ms():
-- Redis TIME, read once and only when needed), then this file, then the step's own file.
--
-- Redis does not roll a script back, so every write goes through the undo log below: the first write of a
-- step is the one Redis may refuse for memory (it refuses only a script's first write), and if anything after
-- it fails, the writes made so far are undone in reverse (each inverse cannot fail: it touches a key the step
-- just wrote) and the error is raised. A step that fails therefore leaves nothing behind: the plan stays
-- leased and is recorded, exactly once, when the cause is gone. Counters are added once per step, after the
-- entries, so a batch moves each counter once.

local UNDO = {}
local INC = {}

local function undo_to(mark)
  for i = #UNDO, mark + 1, -1 do
    UNDO[i]()
    UNDO[i] = nil
  end
end

-- Run body(); on any error undo every write and raise the error again. As an error table: a redis.call error
-- caught by pcall is a string ("OOM ...", "READONLY ..."), and error() of a string would prefix it with the line
-- ("user_script:52: OOM ..."), hiding Redis's reply code from the caller's classification (connections.py).
local function atomically(body)
  local ok, result = pcall(body)
  if not ok then
    undo_to(0)
    if type(result) == 'string' then result = {err = result} end
    error(result)
  end
  return result
end

local function text_of(err)
  if type(err) == 'table' and err.err then return string.sub(err.err, 1, 200) end
  return string.sub(tostring(err), 1, 200)
end

local function field(...) return table.concat({...}, C.sep) end

local function count(name, n) INC[name] = (INC[name] or 0) + n end

-- The counters of the step, once per field; each undone with the rest if a later one fails.
local function flush_counts(counters)
  for name, n in pairs(INC) do
    redis.call('HINCRBY', counters, name, n)
    UNDO[#UNDO + 1] = function() redis.call('HINCRBY', counters, name, -n) end
  end
  INC = {}
end

-- Heat ----------------------------------------------------------------------------------------------------------
local LEVELS, ACTIONS = {}, {}
for _, v in ipairs(C.levels) do LEVELS[v] = true end
for _, v in ipairs(C.actions) do ACTIONS[v] = true end
local HEAT_FIELDS = {}
for i, pair in ipairs(C.heat_copied) do HEAT_FIELDS[i] = pair[2] end
for _, name in ipairs(C.heat_debug) do HEAT_FIELDS[#HEAT_FIELDS + 1] = name end

-- Well-formed UTF-8 sequences, as strict as Python's decoder (no overlong forms, surrogates or code points
-- above U+10FFFF). Each is replaced by an ASCII byte (in C, by gsub); any byte >= 0x80 left over is malformed.
local UTF8_SEQUENCES = {
  '[\194-\223][\128-\191]',
  '\224[\160-\191][\128-\191]', '[\225-\236\238\239][\128-\191][\128-\191]', '\237[\128-\159][\128-\191]',
  '\240[\144-\191][\128-\191][\128-\191]', '[\241-\243][\128-\191][\128-\191][\128-\191]',
  '\244[\128-\143][\128-\191][\128-\191]',
}
local function utf8_ok(s)
  if not string.find(s, '[\128-\255]') then return true end
  for _, pattern in ipairs(UTF8_SEQUENCES) do s = string.gsub(s, pattern, '.') end
  return not string.find(s, '[\128-\255]')
end

local function problem(name, value)
  if #value > C.max_copied then return 'longer than ' .. C.max_copied .. ' characters' end
  if value == '' then return nil end
  local check = C.heat_checks[name]
  if check == 'level' and not LEVELS[value] then return 'unknown level ' .. value end
  if check == 'action' and not ACTIONS[value] then return 'unknown action ' .. value end
  if check == 'number' then
    local n = tonumber(value)
    if not n or string.find(value, '[xX]') then return 'not a number' end
    if n ~= n or n == math.huge or n == -math.huge then return 'not a finite number' end
  end
  return nil
end

local function unreadable(why) return {reason = C.parse_error, copied = {}, debug = {parse = why}} end

-- Read a heat hash: nil when absent, else {reason = ok | parse_error, copied = {...}, debug = {...}}. Found
-- means the key exists (any field); only WRONGTYPE or an unreadable field the contract uses makes it unreadable.
-- `pushed`: its write was just announced, so it most likely exists (HMGET first, EXISTS only if all empty).
local function read_heat(key, debug_cap, pushed)
  if not pushed and redis.call('EXISTS', key) == 0 then return nil end
  local raw = redis.pcall('HMGET', key, unpack(HEAT_FIELDS))
  if raw.err then return unreadable(string.sub(raw.err, 1, 80)) end
  local any = false
  for i = 1, #HEAT_FIELDS do if raw[i] then any = true end end
  if pushed and not any and redis.call('EXISTS', key) == 0 then return nil end
  local copied = {}
  for i, pair in ipairs(C.heat_copied) do
    local value = raw[i] or ''
    if #value <= C.max_copied and not utf8_ok(value) then return unreadable('heat hash is not UTF-8') end
    local why = problem(pair[2], value)
    if why then return unreadable(pair[2] .. ': ' .. why) end
    copied[pair[1]] = value
  end
  local debug = {}
  for i, name in ipairs(C.heat_debug) do
    local value = raw[#C.heat_copied + i]
    if value and value ~= '' then
      if #value > debug_cap then debug.truncated = true
      elseif not utf8_ok(value) then return unreadable('heat hash is not UTF-8')
      else debug[name] = value end
    end
  end
  return {reason = C.ok, copied = copied, debug = debug}
end

-- The entry -----------------------------------------------------------------------------------------------------
-- debug_json: the caller's context plus what the step and the heat record say, at most cap characters.
local function debug_json(context, extra, heat_debug, cap)
  local ctx = {}
  for k, v in pairs(context) do ctx[k] = v end
  for k, v in pairs(extra) do ctx[k] = v end
  for k, v in pairs(heat_debug or {}) do ctx[k] = v end
  local text = cjson.encode(ctx)
  for _, k in ipairs(C.debug_drop) do
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

-- Append an entry (fields in the contract's order, then `late`): the step's first write when it records.
local function add_entry(stream, maxlen, e, late)
  now_ms()
  local values = {ts_epoch = TS_EPOCH, plan_id = e.plan, symbol = e.symbol, apply_component = C.apply_component,
                  obs_point = e.point, heat_found = (e.reason == C.ok) and '1' or '0', heat_reason = e.reason,
                  apply_decision = e.decision, debug_json = e.debug}
  for _, pair in ipairs(C.heat_copied) do values[pair[1]] = e.copied[pair[1]] or '' end
  local args = {}
  for _, name in ipairs(C.stream_fields) do
    args[#args + 1] = name
    args[#args + 1] = values[name]
  end
  for _, v in ipairs(late or {}) do args[#args + 1] = v end
  local id = redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', unpack(args))
  UNDO[#UNDO + 1] = function() redis.call('XDEL', stream, id) end
end

-- The lease -------------------------------------------------------------------------------------------------------
-- The lease is C.lease, then C.lease_fields, joined by C.lease_sep; the `_ms` fields are whole numbers.
local function lease_value(lease)
  local parts = {C.lease}
  for _, name in ipairs(C.lease_fields) do
    local value = lease[name]
    if string.sub(name, -3) == '_ms' then value = string.format('%d', value) end
    parts[#parts + 1] = value
  end
  return table.concat(parts, C.lease_sep)
end

-- A plan's lease: nil when its key is absent, false when it holds a record marker (recorded, lost, refused),
-- 'bad' when it holds anything our steps never write (another type, garbage), else the lease's fields (and its
-- raw value, to restore on undo).
local function lease_of(key)
  local raw = redis.pcall('GET', key)
  if not raw then return nil end
  if type(raw) ~= 'string' then return 'bad' end
  local parts = {}
  for part in string.gmatch(raw .. C.lease_sep, '([^' .. C.lease_sep .. ']*)' .. C.lease_sep) do
    parts[#parts + 1] = part
  end
  if parts[1] ~= C.lease then
    if parts[1] == C.recorded or raw == C.lost_marker or raw == C.refused_marker or raw == '1'
        or string.sub(raw, 1, #C.refused_marker + 1) == C.refused_marker .. C.lease_sep then return false end
    return 'bad'
  end
  if #parts ~= #C.lease_fields + 1 then return 'bad' end
  local lease = {raw = raw}
  for i, name in ipairs(C.lease_fields) do
    local value = parts[i + 1]
    if string.sub(name, -3) == '_ms' then
      -- At most 15 digits: a whole number a Lua double holds exactly (a longer one can be inf: unwritable).
      if not string.match(value, '^%d+$') or #value > 15 then return 'bad' end
      value = tonumber(value)
    end
    lease[name] = value
  end
  if lease.published_ms > lease.deadline_ms then return 'bad' end
  return lease
end

-- Gaps: windows in which the workers could not reach Redis ("start-end" -> end, Redis ms).
local function gaps_after(key, since)
  local out = {}
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', key, since, '+inf')) do
    local s, e = string.match(member, '^(%d+)-(%d+)$')
    if s then out[#out + 1] = {tonumber(s), tonumber(e)} end
  end
  return out
end

local function gap_over(gaps, from, to)
  for _, gap in ipairs(gaps) do
    if gap[1] <= to and gap[2] >= from then return gap end
  end
  return nil
end

-- The reason of a publish_plan_post record, the wait to write and the extras for debug_json, decided now
-- (heat seen, or the deadline passed): the heat proves `ok` if it was seen in time, or was stamped (its
-- ts_epoch, HeatBridge's Redis time) by the deadline; a window that overlapped a Redis gap is `redis_error`
-- (the observer could not watch it); a plan whose first message never reached the broker is `missing`;
-- only a watched window without heat in time is a `timeout`.
local function late_reason(lease, heat, gaps, unsent, extra)
  local now, published, deadline = now_ms(), lease.published_ms, lease.deadline_ms
  local window = deadline - published
  if heat and heat.reason == C.parse_error then return C.parse_error, math.min(now - published, window) end
  if heat and now <= deadline + A.slack_ms then return C.ok, now - published end
  if now > deadline then extra.late_ms = now - deadline end
  if heat then
    local ts = tonumber(heat.copied.heat_ts_epoch or '')
    if ts and ts * 1000 <= deadline then
      extra.found_late = true
      return C.ok, math.max(0, math.min(math.floor(ts * 1000) - published, window))
    end
    extra.heat_after_deadline = true
  end
  local gap = gap_over(gaps(), published, deadline)
  if gap then
    extra.gap = string.format('%d-%d', gap[1], gap[2])
    extra.cause = 'Redis unreachable during the wait'
    return C.redis_error, window
  end
  if unsent then
    extra.unsent = unsent
    extra.cause = 'first message never reached the broker'
    return C.missing, window
  end
  return C.timeout, window
end

local function bucket_of(wait)
  for bound in string.gmatch(A.buckets, '%d+') do  -- ascending upper bounds (ms)
    if wait <= tonumber(bound) then return C.bucket .. bound end
  end
  return C.bucket .. '+Inf'
end

-- Record a leased plan's publish_plan_post outcome: the entry, the marker in place of the lease (the
-- exactly-once step: only whoever replaces the lease writes the entry), the ledger's member; the counters are
-- added by flush_counts. Returns {reason, wait ms}.
local function record_late(lease_key, plan, lease, reason, wait, heat, path, polls, extra)
  extra.wait_ms, extra.polls, extra.by = wait, polls, path
  local debug = debug_json(A.context, extra, heat and heat.debug, A.debug_cap)
  local copied = (reason == C.ok or reason == C.parse_error) and heat and heat.copied or {}
  add_entry(K.stream, A.maxlen, {plan = plan, symbol = lease.symbol, point = C.late_point, reason = reason,
            copied = copied, decision = lease.decision, debug = debug},
            {C.late_fields[1], string.format('%d', wait), C.late_fields[2], tostring(polls), C.late_fields[3], path})
  redis.call('SET', lease_key, C.recorded .. C.lease_sep .. reason, 'EX', A.ttl_s)
  if lease.raw then UNDO[#UNDO + 1] = function() redis.call('SET', lease_key, lease.raw) end
  else UNDO[#UNDO + 1] = function() redis.call('DEL', lease_key) end end
  if lease.end_ms and redis.call('ZREM', K.inflight, plan) == 1 then
    UNDO[#UNDO + 1] = function() redis.call('ZADD', K.inflight, lease.end_ms, plan) end
  end
  local name = field(C.reason, C.late_point, reason, path)
  if reason == C.ok then
    name = field(name, bucket_of(wait))
    count(C.wait_sum, wait)
  end
  count(name, 1)
  return {reason, string.format('%d', wait)}
end
