-- KEYS: 1 the lease (im:outbox:lease, im:retention:lease).  ARGV: 1 owner, 2 ttl ms.
-- Takes the lease if nobody holds it, extends it if the owner does.
-- Returns 1 if the owner holds it now, else 0.
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
