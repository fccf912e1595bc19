-- KEYS: 1 info, 2 members, then the outbox keys if the group.changed
--       event is recorded (outbox.lua).
-- ARGV: 1 group id, 2... (uid, tag hex) pairs, then the event's values
--       (outbox.lua; the data completed with the uids removed).
-- Returns {'ok', packed removed uids, and if uids were removed and the
-- event was to be recorded 1 (kept) or 0 (the outbox was full)} or
-- {'notfound'}.  indexHere (a line store.py puts in front) false on a
-- Redis Cluster: the store removes the group from their groups itself.
local event, lastArg = outboxArgs(2)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'notfound'}
end
local removed = {}
local uids = {}
for i = 2, lastArg, 2 do
  if redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    put(removed, ARGV[i])
    uids[#uids + 1] = ARGV[i]
    if indexHere then
      redis.call('SREM', 'im:{u:' .. ARGV[i + 1] .. '}:groups', ARGV[1])
    end
  end
end
local kept = nil
if event and #uids > 0 then
  kept = event.record(uids)
end
return {'ok', table.concat(removed), kept}
