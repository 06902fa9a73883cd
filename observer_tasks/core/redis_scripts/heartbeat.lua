-- A worker's heartbeat, on Redis's clock: its entry in the workers hash and the wake path's health.
-- KEYS[1] workers HASH (nodename -> JSON)  KEYS[2] wake_ok  KEYS[3] wake_degraded
-- ARGV[1] nodename  ARGV[2] JSON of the worker's state (without seen_ms)  ARGV[3] wake state
-- ARGV[4] health TTL (ms)  ARGV[5] entries older than this are removed (ms)
-- wake_ok exists while some listener is connected; wake_degraded while some live worker's is not:
-- the chain uses the safety interval only when the first exists and the second does not.
-- Returns Redis time (ms).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = cjson.decode(ARGV[2])
state.seen_ms = now
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode(state))
if ARGV[3] == 'connected' then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[4])
else
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[4])
end
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local ok, entry = pcall(cjson.decode, all[i + 1])
  if not ok or type(entry) ~= 'table' or not tonumber(entry.seen_ms)
      or tonumber(entry.seen_ms) < now - tonumber(ARGV[5]) then
    redis.call('HDEL', KEYS[1], all[i])
  end
end
return tostring(now)
