-- A worker's heartbeat, on Redis's clock: its entry in the workers hash, the Redis gap it saw (if any), and
-- the wake path's health, decided here for every worker: healthy while some fresh worker's wake listener is
-- connected and no fresh worker with the wake path on reports its listener down (a fresh worker beat within
-- fresh_ms). The looks and the apply layer's first messages read it as the key K.wake: one key, one rule.
-- Returns Redis time (ms).
local now = now_ms()
local state = cjson.decode(A.state)
state.seen_ms = now
redis.call('HSET', K.workers, A.nodename, cjson.encode(state))

local all = redis.call('HGETALL', K.workers)

-- A gap this worker saw is Redis's (every plan whose window it overlaps is redis_error unless heat proves ok)
-- unless another fresh worker reached Redis throughout it: then it was this worker's link, and the others
-- watched. Several workers see the same outage: merge with a gap it overlaps, count each outage once.
local function vouched(start)
  for i = 1, #all, 2 do
    local ok, entry = pcall(cjson.decode, all[i + 1])
    if ok and type(entry) == 'table' and all[i] ~= A.nodename and tonumber(entry.seen_ms)
        and tonumber(entry.seen_ms) >= now - A.fresh_ms and tonumber(entry.answering_since_ms)
        and tonumber(entry.answering_since_ms) > 0 and tonumber(entry.answering_since_ms) <= start then
      return true
    end
  end
  return false
end

if A.gap_start_ms > 0 and A.gap_start_ms < now and not vouched(A.gap_start_ms) then
  local start, stop, merged = A.gap_start_ms, now, false
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', K.gaps, start, '+inf')) do
    local s, e = string.match(member, '^(%d+)-(%d+)$')
    if s and tonumber(s) <= stop then
      start, stop, merged = math.min(start, tonumber(s)), math.max(stop, tonumber(e)), true
      redis.call('ZREM', K.gaps, member)
    end
  end
  redis.call('ZADD', K.gaps, stop, string.format('%d-%d', start, stop))
  if not merged then redis.call('HINCRBY', K.counters, C.gaps, 1) end
  redis.call('ZREMRANGEBYSCORE', K.gaps, '-inf', now - A.gaps_keep_ms)
  redis.call('ZREMRANGEBYRANK', K.gaps, 0, -(A.gaps_max + 1))
end

local connected, degraded = false, false
for i = 1, #all, 2 do
  local ok, entry = pcall(cjson.decode, all[i + 1])
  local seen = ok and type(entry) == 'table' and tonumber(entry.seen_ms)
  if not seen or seen < now - A.forget_ms then
    redis.call('HDEL', K.workers, all[i])
  elseif seen >= now - A.fresh_ms then
    if entry.wake == 'connected' then connected = true elseif entry.wake ~= 'off' then degraded = true end
  end
end
if connected and not degraded then
  redis.call('SET', K.wake, string.format('%d', now), 'PX', A.health_ttl_ms)
else
  redis.call('DEL', K.wake)
end
return string.format('%d', now)
