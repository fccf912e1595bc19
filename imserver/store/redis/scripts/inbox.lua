-- The inbox helpers shared by deliver.lua (one Redis) and the cluster
-- mode's deliverBegin.lua and deliverAppend.lua (store.py puts this after
-- prelude.lua in front of them).  Each works on the keys of one slot: on
-- a Redis Cluster the epoch, floor and run id keys are those of the slot
-- of the inboxes they guard (keys.py).
--
-- checkFloor: the epoch and seq floor bookkeeping (docs/architecture.md,
-- "Seqs, the floor and the epoch"): creates the epoch and the floor if
-- there is no epoch, raises the floor if the run id changed (a restart or
-- a failover that may have lost writes).  Returns epoch, floor (a number)
-- and status 'same', 'new' or 'restart'.
local function checkFloor(epochKey, floorKey, runIdKey, candidate, newEpoch, runId)
  local meta = redis.call('MGET', epochKey, floorKey, runIdKey)
  local epoch, floor = meta[1], meta[2]
  if not epoch then
    floor = math.max(tonumber(candidate), timeFloor())
    redis.call('SET', epochKey, newEpoch)
    redis.call('SET', floorKey, fmt(floor))
    redis.call('SET', runIdKey, runId)
    return newEpoch, floor, 'new'
  elseif not floor or meta[3] ~= runId then
    floor = math.max(tonumber(floor or '0'), tonumber(candidate), timeFloor())
    redis.call('SET', floorKey, fmt(floor))
    redis.call('SET', runIdKey, runId)
    return epoch, floor, 'restart'
  end
  return epoch, tonumber(floor), 'same'
end

-- The run id of this Redis process (on a cluster, where the gate cannot
-- know which process runs the script).
local function serverRunId()
  return string.match(redis.call('INFO', 'server'), 'run_id:(%x+)') or 'unknown'
end

-- Store a message body (with PX ttl unless ttl is '') and index it by
-- created ms.
local function storeBody(bodyKey, indexKey, id, now, body, ttl)
  if ttl ~= '' then
    redis.call('SET', bodyKey, body, 'PX', ttl)
  else
    redis.call('SET', bodyKey, body)
  end
  redis.call('ZADD', indexKey, now, id)
end

-- Append message id to the inboxes of recipients (uid, user tag hex, uid,
-- ...): per recipient seq = max(head, floor) + 1.  Puts (uid, seq) in
-- parts; returns the sender's seq ('0' if the sender is not among them).
local function appendAll(recipients, sender, id, now, floor, parts)
  local senderSeq = '0'
  for i = 1, #recipients, 2 do
    local uid = recipients[i]
    local prefix = 'im:{u:' .. recipients[i + 1] .. '}:'
    local head = tonumber(redis.call('GET', prefix .. 'head') or '0')
    if head < floor then
      head = floor
    end
    local seq = fmt(head + 1)
    local outgoing = '0'
    if uid == sender then
      outgoing = '1'
      senderSeq = seq
    end
    redis.call('SET', prefix .. 'head', seq)
    redis.call('ZADD', prefix .. 'inbox', seq, seq .. ':' .. id .. ':' .. outgoing .. ':' .. now)
    put(parts, uid)
    put(parts, seq)
  end
  return senderSeq
end
