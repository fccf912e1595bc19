-- Redis Cluster mode, step 2 of a deliver: the entries of the recipients
-- of one or more slots, all served by the primary it runs on (keys.py: the
-- slot keys are those of each slot); idempotent per slot on the message
-- id: a retry answers the seqs given the first time.
-- KEYS: the first slot's 1 epoch, 2 seq floor, 3 run id, 4 applied record
--       of the message, 5 body key of the message, 6 bodies index.  Only
--       these are declared (the declared keys of a call on a cluster must
--       be of one slot, and route it); the other slots' keys are in ARGV.
--       The body and the applied record are new keys: while that slot
--       migrates, Redis refuses the call (ASK, then TRYAGAIN on the target)
--       until all of the slot's keys are moved.
-- ARGV: 1 sender, 2 now ms, 3 dedup window ms, 4 floor from the gate's
--       clock, 5 a new epoch id, 6 message id, 7 body, 8 body TTL ms or '',
--       then per slot, the first included: its 6 keys (as KEYS above), the
--       number n of its recipients, then n (uid, user tag hex) pairs.
-- Before anything is written, the applied record of every slot after the
-- first is probed: a slot this node does not serve, or is migrating and
-- has not got that key (it never has before the first append), makes
-- Redis refuse the access, and the script answers {'moved', i} having
-- written nothing; the gate then sends each slot its own call, which
-- follows MOVED and ASK (store.py).  A slot applied before is only read.
-- Returns, per slot in order, {'ok', epoch, status, packed (uid, seq, ...)}
-- or, applied before, {'again', epoch, status, packed}; or {'moved', i}.
local slots, i = {}, 9
while i <= #ARGV do
  local n = tonumber(ARGV[i + 6])
  slots[#slots + 1] = i
  i = i + 7 + 2 * n
end
for s = 2, #slots do
  local probe = redis.pcall('EXISTS', ARGV[slots[s] + 3])
  if type(probe) == 'table' and probe.err then
    return {'moved', s}
  end
end
local runId = serverRunId()
local window = fmt(math.max(1, tonumber(ARGV[3])))
local out = {}
for s = 1, #slots do
  local k = slots[s]
  local epoch, floor, status = checkFloor(ARGV[k], ARGV[k + 1], ARGV[k + 2], ARGV[4], ARGV[5],
                                          runId)
  local applied = redis.call('GET', ARGV[k + 3])
  if applied then
    out[s] = {'again', epoch, status, applied}
  else
    local recipients = {}
    for j = k + 7, k + 6 + 2 * tonumber(ARGV[k + 6]) do
      recipients[#recipients + 1] = ARGV[j]
    end
    storeBody(ARGV[k + 4], ARGV[k + 5], ARGV[6], ARGV[2], ARGV[7], ARGV[8])
    local parts = {}
    appendAll(recipients, ARGV[1], ARGV[6], ARGV[2], floor, parts)
    local packed = table.concat(parts)
    redis.call('SET', ARGV[k + 3], packed, 'PX', window)
    out[s] = {'ok', epoch, status, packed}
  end
end
return out
