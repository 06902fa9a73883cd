-- The plans whose lease has ended (inflight score <= Redis TIME), oldest first: one page for the sweep step,
-- which store.py calls with their dedupe keys (so every key a step touches arrives in KEYS).
-- KEYS[1] inflight ZSET
-- ARGV (by name): offset, limit
-- Returns {now ms, {plan, ...}}.
return {string.format('%d', NOW), redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', NOW, 'LIMIT', num('offset'),
                                             num('limit'))}
