-- KEYS: 1 im:epoch, 2 im:seqfloor, 3 im:runid, 4 dedup record, 5 body,
--       6 im:bodies, 7 group members (group messages only), then the
--       outbox keys if the message.stored event is recorded (outbox.lua)
-- ARGV: 1 sender, 2 now ms, 3 dedup window ms, 4 floor from the gate's
--       clock, 5 a new epoch id, 6 Redis run id, 7 message id, 8 body,
--       9 body TTL ms or '', 10 '1' for a group message, 11... recipients
--       (uid, user tag hex) pairs, then the event's values (outbox.lua):
--       its data is completed with the uids the message was appended to,
--       the sender's own excluded
-- (The helpers are in inbox.lua.  store.py loads it twice: with
-- outbox.lua, used when the store records message.stored, and without:
-- outboxArgs false, no event, no cost.)
-- Returns {'ok', epoch, status, packed (uid, seq, uid, seq, ...), and if
--   the event was to be recorded 1 (kept) or 0 (the outbox was full)},
--   {'dup', epoch, status, id, sender seq, created ms, body or nil} or
--   {'notmember', epoch, status}; status is 'same', 'new' or 'restart'.
local sender, now = ARGV[1], tonumber(ARGV[2])
local event, lastArg = nil, #ARGV
if outboxArgs then
  event, lastArg = outboxArgs(ARGV[10] == '1' and 7 or 6)
end
local epoch, floor, status = checkFloor(KEYS[1], KEYS[2], KEYS[3], ARGV[4], ARGV[5], ARGV[6])

local seen = redis.call('GET', KEYS[4])
if seen then
  local id, senderSeq, created = string.match(seen, '^(%d+):(%d+):(%d+)$')
  if tonumber(created) > now - tonumber(ARGV[3]) then
    local body = redis.call('GET', 'im:m:' .. id)
    return {'dup', epoch, status, id, senderSeq, created, body}
  end
end

-- recipients: uid, user tag hex, uid, user tag hex, ...
local recipients = {}
if ARGV[10] == '1' then
  local member = sender == ''
  local all = redis.call('HGETALL', KEYS[7])
  for i = 1, #all, 2 do
    recipients[i] = all[i]
    recipients[i + 1] = string.match(all[i + 1], '^%d+:%d+:(%x*)$')
    if all[i] == sender then
      member = true
    end
  end
  if #recipients == 0 or not member then
    return {'notmember', epoch, status}
  end
else
  for i = 11, lastArg do
    recipients[i - 10] = ARGV[i]
  end
end

local id = ARGV[7]
storeBody(KEYS[5], KEYS[6], id, ARGV[2], ARGV[8], ARGV[9])
local parts = {}
local senderSeq = appendAll(recipients, sender, id, ARGV[2], floor, parts)
local window = math.max(1, tonumber(ARGV[3]))
redis.call('SET', KEYS[4], id .. ':' .. senderSeq .. ':' .. ARGV[2], 'PX', fmt(window))
local kept = nil
if event then
  local uids = {}
  for i = 1, #recipients, 2 do
    if recipients[i] ~= sender then
      uids[#uids + 1] = recipients[i]
    end
  end
  kept = event.record(uids)
end
return {'ok', epoch, status, table.concat(parts), kept}
