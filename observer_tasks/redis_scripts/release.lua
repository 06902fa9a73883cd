-- Give back a plan's lease without recording (its first message could not be sent).
-- KEYS[1] inflight ZSET  KEYS[2] leases HASH   ARGV[1] plan_id
redis.call('ZREM', KEYS[1], ARGV[1])
return redis.call('HDEL', KEYS[2], ARGV[1])
