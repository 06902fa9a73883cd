-- A page of the plans whose lease has ended (inflight score <= Redis TIME), oldest first, for the sweep step
-- (which gets their keys declared). Returns {now ms, {plan, ...}}.
return {string.format('%d', now_ms()), redis.call('ZRANGEBYSCORE', K.inflight, '-inf', now_ms(), 'LIMIT', A.offset,
                                                   A.limit)}
