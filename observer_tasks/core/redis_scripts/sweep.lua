-- The sweep step: decide each given plan whose lease has ended (nobody recorded it by deadline + grace: its
-- message was lost, its worker died or is far behind, or every worker was down) by the same rule as a look
-- (late_reason: the heat proves `ok`; a gap makes it `redis_error`; an unsent note `missing`; else
-- `timeout`), with the cause in debug_json; and free the slot of a member nobody can record (an id our
-- admission never writes, or an unreadable lease). A plan whose record fails is skipped and reported: its
-- writes are undone, it stays in the ledger and never blocks the others.
-- Returns {now ms, recorded count, {freed plan, ...}, {skipped plan, error, ...}, {plan, reason, wait ms, ...}}.
local cached
local function gaps()
  if not cached then cached = gaps_after(K.gaps, 0) end
  return cached
end

return atomically(function()
  local now = now_ms()
  local freed, skipped, outcomes, recorded = {}, {}, {}, 0
  for _, plan in ipairs(A.foreign) do
    local score = redis.call('ZSCORE', K.inflight, plan)
    if score and tonumber(score) <= now then
      redis.call('ZREM', K.inflight, plan)
      freed[#freed + 1] = plan
    end
  end
  local notes = {}
  if #ITEMS > 0 then
    local names = {}
    for _, item in ipairs(ITEMS) do
      names[#names + 1] = item.unsent
      names[#names + 1] = item.failed
    end
    notes = redis.call('MGET', unpack(names))
  end
  for i, item in ipairs(ITEMS) do
    local mark, pending = #UNDO, {}
    for k, v in pairs(INC) do pending[k] = v end
    local ok, result = pcall(function()
      local lease = lease_of(item.lease)
      if lease == nil or lease == 'bad' then  -- no lease nobody can record: free its slot
        redis.call('ZREM', K.inflight, item.plan)
        return 'freed'
      end
      if not lease then return nil end  -- recorded meanwhile (a look, the wake step, another sweeper)
      local extra = {swept = true}
      local unsent, failed = notes[2 * i - 1], notes[2 * i]
      if failed then extra.failed = failed end
      local heat = read_heat(item.heat, A.debug_cap, false)
      local reason, wait = late_reason(lease, heat, gaps, unsent or nil, extra)
      if reason == C.timeout then extra.cause = 'no observation by deadline + grace (message lost or worker stopped)' end
      local outcome = record_late(item.lease, item.plan, lease, reason, wait, heat, C.path_sweep, 0, extra)
      return outcome
    end)
    if not ok then
      undo_to(mark)
      INC = pending
      skipped[#skipped + 1] = item.plan
      skipped[#skipped + 1] = text_of(result)
    elseif result == 'freed' then
      freed[#freed + 1] = item.plan
    elseif result then
      recorded = recorded + 1
      outcomes[#outcomes + 1] = item.plan
      outcomes[#outcomes + 1] = result[1]
      outcomes[#outcomes + 1] = result[2]
    end
  end
  flush_counts(K.counters)
  return {string.format('%d', now), recorded, freed, skipped, outcomes}
end)
