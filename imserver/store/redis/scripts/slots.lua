-- The Redis Cluster mode's appends to the inboxes of several slots of one
-- primary (store.py puts this after prelude.lua and inbox.lua in front of
-- deliverAppend.lua and deliverBegin.lua).  Only one slot's keys can be
-- declared by a call; a script may touch the keys of the other slots its
-- node serves, which the gate passes in ARGV as slot blocks: per slot its
-- 6 keys (epoch, seq floor, run id, applied record of the message, body
-- key of the message, bodies index), the number n of its recipients, then
-- n (uid, user tag hex) pairs.  Both scripts share ARGV 1-8: sender, now
-- ms, dedup window ms, floor from the gate's clock, a new epoch id,
-- message id, body, body TTL ms or ''.

-- The index in ARGV of each slot block from index i on.
local function slotBlocks(i)
  local blocks = {}
  while i <= #ARGV do
    blocks[#blocks + 1] = i
    i = i + 7 + 2 * tonumber(ARGV[i + 6])
  end
  return blocks
end

-- The number of the first of blocks[from...] whose slot this node does not
-- serve now, or nil.  Each block's applied record is probed: a slot moved
-- away, or migrating without that key (it never has it before the first
-- append), makes Redis refuse the access (redis.pcall).  A slot applied
-- before passes, and is then only read.
local function refusedBlock(blocks, from)
  for b = from, #blocks do
    local probe = redis.pcall('EXISTS', ARGV[blocks[b] + 3])
    if type(probe) == 'table' and probe.err then
      return b
    end
  end
  return nil
end

-- Append the message to the recipients of the slot block at k, unless its
-- applied record says it was: {'ok' or 'again', epoch, status, packed
-- (uid, seq, ...)}, the seqs given.  runId: serverRunId().
local function appendBlock(k, runId)
  local epoch, floor, status = checkFloor(ARGV[k], ARGV[k + 1], ARGV[k + 2], ARGV[4], ARGV[5],
                                          runId)
  local applied = redis.call('GET', ARGV[k + 3])
  if applied then
    return {'again', epoch, status, applied}
  end
  local recipients = {}
  for j = k + 7, k + 6 + 2 * tonumber(ARGV[k + 6]) do
    recipients[#recipients + 1] = ARGV[j]
  end
  storeBody(ARGV[k + 4], ARGV[k + 5], ARGV[6], ARGV[2], ARGV[7], ARGV[8])
  local parts = {}
  appendAll(recipients, ARGV[1], ARGV[6], ARGV[2], floor, parts)
  local packed = table.concat(parts)
  redis.call('SET', ARGV[k + 3], packed, 'PX', fmt(math.max(1, tonumber(ARGV[3]))))
  return {'ok', epoch, status, packed}
end
