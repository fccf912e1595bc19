-- Redis Cluster mode, step 1 of a deliver, on the sender's slot (keys.py:
-- the slot keys are those of the sender's slot); also step 2 for the
-- other slots of the same primary (slots.lua).
-- KEYS: 1 slot epoch, 2 slot seq floor, 3 slot run id, 4 dedup record,
--       5 slot body key of the message, 6 slot bodies index.
-- ARGV: 1 sender, 2 now ms, 3 dedup window ms, 4 floor from the gate's
--       clock, 5 a new epoch id, 6 message id, 7 body, 8 body TTL ms or '',
--       9 the slot's body key prefix, 10 packed (uid, tag hex, ...) of the
--       recipients in other slots, 11 '1' to only look for the dedup
--       record, 12 the number 2n of the items that follow: 13...12+2n the
--       (uid, user tag hex) pairs of the recipients in this slot (the
--       sender's own entry among them); then a slot block (slots.lua) per
--       other slot of this primary holding recipients, if any.
-- The dedup record is a hash: id, seq (the sender's), created, here
-- (packed uid, seq of the entries of this slot), there (ARGV 10): a retry
-- finds in it what to complete (deliverAppend.lua, idempotent).
-- Returns {'ok', epoch, status, packed (uid, seq, ...) of this slot, then
--   per slot block as deliverAppend.lua}, {'dup', epoch, status, id, sender
--   seq, created ms, body or nil, here, there}, looking only {'none',
--   epoch, status}, or, a slot block's slot not served here, {'moved', i}
--   having written nothing of the message.
local now = tonumber(ARGV[2])
local runId = serverRunId()
local epoch, floor, status = checkFloor(KEYS[1], KEYS[2], KEYS[3], ARGV[4], ARGV[5], runId)
local seen = redis.call('HMGET', KEYS[4], 'id', 'seq', 'created', 'here', 'there')
if seen[1] and tonumber(seen[3]) > now - tonumber(ARGV[3]) then
  local body = redis.call('GET', ARGV[9] .. seen[1])
  return {'dup', epoch, status, seen[1], seen[2], seen[3], body, seen[4], seen[5]}
end
if ARGV[11] == '1' then
  return {'none', epoch, status}
end
local last = 12 + tonumber(ARGV[12])
local blocks = slotBlocks(last + 1)
local refused = refusedBlock(blocks, 1)
if refused then
  return {'moved', refused}
end
local recipients = {}
for i = 13, last do
  recipients[i - 12] = ARGV[i]
end
local id = ARGV[6]
storeBody(KEYS[5], KEYS[6], id, ARGV[2], ARGV[7], ARGV[8])
local parts = {}
local senderSeq = appendAll(recipients, ARGV[1], id, ARGV[2], floor, parts)
local here = table.concat(parts)
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'id', id, 'seq', senderSeq, 'created', ARGV[2], 'here', here,
           'there', ARGV[10])
redis.call('PEXPIRE', KEYS[4], fmt(math.max(1, tonumber(ARGV[3]))))
local out = {'ok', epoch, status, here}
for b = 1, #blocks do
  out[4 + b] = appendBlock(blocks[b], runId)
end
return out
