-- KEYS: 1 info, 2 members, then the outbox keys if the group.changed
--       event is recorded (outbox.lua).
-- ARGV: 1 group id, then the event's values (outbox.lua; the data
--       complete).
-- Returns 'notfound', or 'ok' (event kept, or none to record) or 'full'
-- (the outbox was full).
-- indexHere (a line store.py puts in front) false on a Redis Cluster: the
-- members' groups are left to the store, and the reply is {'ok', packed
-- tag hex of the members}.
local event = outboxArgs(2)
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'notfound'
end
local tags = {}
for _, value in ipairs(redis.call('HVALS', KEYS[2])) do
  local tag = string.match(value, '^%d+:%d+:(%x*)$')
  if indexHere then
    redis.call('SREM', 'im:{u:' .. tag .. '}:groups', ARGV[1])
  else
    put(tags, tag)
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
if not indexHere then
  return {'ok', table.concat(tags)}
end
if event and event.record(nil) == 0 then
  return 'full'
end
return 'ok'
