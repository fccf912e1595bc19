-- Redis Cluster mode: record a message.stored event once per message id
-- (the deliver steps are on the users' slots, the outbox on {im}'s).
-- KEYS: 1 the outbox stream, 2 its last id, 3 its store id (outbox.lua),
--       4 the event's marker, set for the dedup window.
-- ARGV: 1 limit, 2 a new store id, 3 now ms, 4 type, 5 ordering key,
--       6 data, 7 dedup window ms.
-- Returns 1 (kept), 0 (the outbox was full) or 2 (recorded before).
if not redis.call('SET', KEYS[4], '1', 'NX', 'PX', ARGV[7]) then
  return 2
end
local o = {stream = KEYS[1], last = KEYS[2], store = KEYS[3], limit = tonumber(ARGV[1]),
           storeId = ARGV[2]}
return outboxLib().add(o, ARGV[4], ARGV[5], tonumber(ARGV[3]), ARGV[6])
