-- KEYS: 1 im:msgid.  ARGV: 1 floor from the gate's clock, 2 block size.
-- Returns the last id of the reserved block.
local floor = math.max(tonumber(ARGV[1]), timeFloor())
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < floor then
  redis.call('SET', KEYS[1], fmt(floor))
end
return redis.call('INCRBY', KEYS[1], ARGV[2])
