-- KEYS: 1 im:outbox, 2 im:outbox:store.  ARGV: 1 after id, 2 limit.
-- Returns {packed (id, created ms, type, key, data, ...), store id or nil}.
local parts = {}
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
for _, entry in ipairs(entries) do
  local f = entry[2]
  put(parts, string.match(entry[1], '^(%d+)'))
  -- fields in the order outboxAdd writes them: c, t, k, d
  put(parts, f[2])
  put(parts, f[4])
  put(parts, f[6])
  put(parts, f[8])
end
return {table.concat(parts), redis.call('GET', KEYS[2])}
