-- KEYS: 1 info, 2 members, 3 the owner's groups (not on a cluster), then the outbox keys if
--       the group.changed event is recorded (outbox.lua).
-- ARGV: 1 group id, 2 name, 3 owner, 4 now ms, 5 owner role, 6 owner's tag
--       hex, then the event's values (outbox.lua; the data complete).
-- Returns 'exists', or 'ok' (event kept, or none to record) or 'full'
-- (the outbox was full).
-- indexHere (a line store.py puts in front) false on a Redis Cluster: the
-- store adds the group to the owner's groups itself, first.
local event = outboxArgs(3)
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 'exists'
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'name', ARGV[2], 'created', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[5] .. ':' .. ARGV[4] .. ':' .. ARGV[6])
if indexHere then
  redis.call('SADD', KEYS[3], ARGV[1])
end
if event and event.record(nil) == 0 then
  return 'full'
end
return 'ok'
