-- Redis Cluster mode, step 2 of a deliver: the entries of the recipients
-- of one or more slots, all served by the primary it runs on (keys.py: the
-- slot keys are those of each slot); idempotent per slot on the message
-- id: a retry answers the seqs given the first time.  The helpers are in
-- slots.lua.
-- KEYS: the first slot's 1 epoch, 2 seq floor, 3 run id, 4 applied record
--       of the message, 5 body key of the message, 6 bodies index.  Only
--       these are declared (the declared keys of a call on a cluster must
--       be of one slot, and route it); the other slots' keys are in ARGV.
--       The body and the applied record are new keys: while that slot
--       migrates, Redis refuses the call (ASK, then TRYAGAIN on the target)
--       until the migration is over.
-- ARGV: 1-8 as slots.lua says, then a slot block per slot, the first
--       included (its keys as KEYS above).
-- If a slot after the first is not served here (refusedBlock), nothing is
-- written and the answer is {'moved', i}: the gate then sends each slot a
-- call of its own, which follows MOVED and ASK (store.py).
-- Returns, per slot in order, {'ok', epoch, status, packed (uid, seq, ...)}
-- or, applied before, {'again', epoch, status, packed}; or {'moved', i}.
local blocks = slotBlocks(9)
local refused = refusedBlock(blocks, 2)
if refused then
  return {'moved', refused}
end
local runId = serverRunId()
local out = {}
for b = 1, #blocks do
  out[b] = appendBlock(blocks[b], runId)
end
return out
