-- Redis Cluster mode, step 2 of a deliver, on each other slot holding
-- recipients (keys.py: the slot keys are those of that slot); idempotent
-- on the message id: a retry answers the seqs given the first time.
-- KEYS: 1 slot epoch, 2 slot seq floor, 3 slot run id, 4 the slot's
--       applied record of the message, 5 slot body key of the message,
--       6 slot bodies index.
-- ARGV: 1 sender, 2 now ms, 3 dedup window ms, 4 floor from the gate's
--       clock, 5 a new epoch id, 6 message id, 7 body, 8 body TTL ms or '',
--       9... (uid, user tag hex) pairs of the recipients in this slot.
-- Returns {'ok', epoch, status, packed (uid, seq, ...)} or, applied
-- before, {'again', epoch, status, packed (uid, seq, ...)}.
local epoch, floor, status = checkFloor(KEYS[1], KEYS[2], KEYS[3], ARGV[4], ARGV[5],
                                        serverRunId())
local applied = redis.call('GET', KEYS[4])
if applied then
  return {'again', epoch, status, applied}
end
local recipients = {}
for i = 9, #ARGV do
  recipients[i - 8] = ARGV[i]
end
storeBody(KEYS[5], KEYS[6], ARGV[6], ARGV[2], ARGV[7], ARGV[8])
local parts = {}
appendAll(recipients, ARGV[1], ARGV[6], ARGV[2], floor, parts)
local packed = table.concat(parts)
redis.call('SET', KEYS[4], packed, 'PX', fmt(math.max(1, tonumber(ARGV[3]))))
return {'ok', epoch, status, packed}
