-- Counts the apply layer's outbox owes Redis (refusals), {field: n}: added to the counters.
for name, n in pairs(A.counts) do redis.call('HINCRBY', K.counters, name, n) end
return 1
