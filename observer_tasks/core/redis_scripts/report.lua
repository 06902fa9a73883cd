-- An apply process's limits, on Redis's clock, for `observer-tasks status`; entries older than forget_ms go.
local now = now_ms()
local state = cjson.decode(A.state)
state.seen_ms = now
redis.call('HSET', K.producers, A.name, cjson.encode(state))
local all = redis.call('HGETALL', K.producers)
for i = 1, #all, 2 do
  local ok, entry = pcall(cjson.decode, all[i + 1])
  if not ok or type(entry) ~= 'table' or (tonumber(entry.seen_ms) or 0) < now - A.forget_ms then
    redis.call('HDEL', K.producers, all[i])
  end
end
return 1
