-- Notes for the sweep's debug_json, one key per plan (expiring with the dedupe TTL, so none is left behind):
-- why a plan's first message was never sent (an unsent key), or the last error of a step that could not
-- record it (a failed key).
for _, item in ipairs(ITEMS) do redis.call('SET', item.note, item.text, 'EX', A.ttl_s) end
return 1
