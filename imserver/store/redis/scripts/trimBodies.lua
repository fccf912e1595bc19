-- KEYS: 1 im:bodies (on a cluster, a slot's).  ARGV: 1 oldest ms kept,
--       2 batch size, 3 the bodies' key prefix (on a cluster, the slot's;
--       default im:m:).
-- Returns the number of bodies deleted.
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[1], 'LIMIT', 0,
                       tonumber(ARGV[2]))
if #ids == 0 then
  return 0
end
local keys = {}
for i, id in ipairs(ids) do
  keys[i] = (ARGV[3] or 'im:m:') .. id
end
redis.call('DEL', unpack(keys))
redis.call('ZREM', KEYS[1], unpack(ids))
return #ids
