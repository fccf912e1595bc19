-- KEYS: 1 info, 2 members, then the outbox keys if the group.changed
--       event is recorded (outbox.lua).
-- ARGV: 1 group id, 2 max size, 3 now ms, 4... (uid, role, tag hex)
--       triples, then the event's values (outbox.lua; the data completed
--       with the uids added).
-- Returns {'ok', packed added uids, and if uids were added and the event
-- was to be recorded 1 (kept) or 0 (the outbox was full)}, {'notfound'} or
-- {'full'}.  indexHere (a line store.py puts in front) false on a Redis
-- Cluster: the store adds the group to the members' groups itself, first.
local event, lastArg = outboxArgs(2)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'notfound'}
end
local added = {}
local uids = {}
for i = 4, lastArg, 3 do
  if redis.call('HEXISTS', KEYS[2], ARGV[i]) == 0 then
    put(added, ARGV[i])
    uids[#uids + 1] = ARGV[i]
  end
end
if #added > 0 and redis.call('HLEN', KEYS[2]) + #added > tonumber(ARGV[2]) then
  return {'full'}
end
for i = 4, lastArg, 3 do
  local uid, role, tag = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local old = redis.call('HGET', KEYS[2], uid)
  if old then
    local joined = string.match(old, '^%d+:(%d+):')
    redis.call('HSET', KEYS[2], uid, role .. ':' .. joined .. ':' .. tag)
  else
    redis.call('HSET', KEYS[2], uid, role .. ':' .. ARGV[3] .. ':' .. tag)
    if indexHere then
      redis.call('SADD', 'im:{u:' .. tag .. '}:groups', ARGV[1])
    end
  end
end
local kept = nil
if event and #uids > 0 then
  kept = event.record(uids)
end
return {'ok', table.concat(added), kept}
