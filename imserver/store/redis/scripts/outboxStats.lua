-- KEYS: 1 im:outbox.
-- Returns {entries, created ms of the first entry or nil}.
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
if first then
  return {redis.call('XLEN', KEYS[1]), first[2][2]}
end
return {0}
