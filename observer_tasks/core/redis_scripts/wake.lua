-- The wake step, for a batch of plans whose heat hash was just written (or every leased plan, on a resync):
-- record each plan still leased whose heat hash exists. A plan whose record fails is skipped and reported: its
-- writes are undone and it stays leased; the others are recorded.
-- Returns {{plan, reason, wait ms, ...} recorded, {plan, error, ...} skipped}.
local cached
local function gaps()
  if not cached then cached = gaps_after(K.gaps, 0) end
  return cached
end

return atomically(function()
  local recorded, skipped = {}, {}
  for _, item in ipairs(ITEMS) do
    local mark, pending = #UNDO, {}
    for k, v in pairs(INC) do pending[k] = v end
    local ok, result = pcall(function()
      local lease = lease_of(item.lease)
      if type(lease) ~= 'table' then return nil end
      local heat = read_heat(item.heat, A.debug_cap, true)
      if not heat then return nil end
      local extra = {}
      local reason, wait = late_reason(lease, heat, gaps, nil, extra)
      return record_late(item.lease, item.plan, lease, reason, wait, heat, C.path_wake, 0, extra)
    end)
    if not ok then
      undo_to(mark)
      INC = pending
      skipped[#skipped + 1] = item.plan
      skipped[#skipped + 1] = text_of(result)
    elseif result then
      recorded[#recorded + 1] = item.plan
      recorded[#recorded + 1] = result[1]
      recorded[#recorded + 1] = result[2]
    end
  end
  flush_counts(K.counters)
  return {recorded, skipped}
end)
