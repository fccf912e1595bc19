-- KEYS: 1 im:outbox, 2 im:outbox:last, 3 im:outbox:store.
-- ARGV: 1 limit, 2 a new store id, 3 now ms, then per event six values:
--       type, ordering key, data, '+' (online) / '-' (offline) / '' (no
--       presence), the gate's im:presence key, the device's field.
-- Returns the number of events kept.  The presence ledger changes even
-- for an event not kept.
local add = outboxLib().add
local o = {stream = KEYS[1], last = KEYS[2], store = KEYS[3], limit = tonumber(ARGV[1]),
           storeId = ARGV[2]}
local now = tonumber(ARGV[3])
local kept = 0
for i = 4, #ARGV, 6 do
  local op = ARGV[i + 3]
  if op == '+' then
    redis.call('HSET', ARGV[i + 4], ARGV[i + 5], ARGV[3])
  elseif op == '-' then
    redis.call('HDEL', ARGV[i + 4], ARGV[i + 5])
  end
  kept = kept + add(o, ARGV[i], ARGV[i + 1], now, ARGV[i + 2])
end
return kept
