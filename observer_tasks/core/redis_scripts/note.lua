-- Notes for the sweep's debug_json, {field: text}: why a plan's first message was never sent (plan), or the
-- last error of a step that could not record it (C.note_failed .. plan).
for name, text in pairs(A.notes) do redis.call('HSET', K.notes, name, text) end
return 1
