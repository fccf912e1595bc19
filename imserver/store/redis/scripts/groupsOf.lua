-- KEYS: 1 the user's groups.  ARGV: 1 uid.
-- Returns packed (group id, name, created, role, member count, ...).
local parts = {}
for _, gid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local prefix = 'im:{g:' .. hex(gid) .. '}:'
  local info = redis.call('HMGET', prefix .. 'info', 'name', 'created')
  local member = redis.call('HGET', prefix .. 'members', ARGV[1])
  if info[1] and member then
    put(parts, gid)
    put(parts, info[1])
    put(parts, info[2])
    put(parts, string.match(member, '^(%d+):'))
    put(parts, tostring(redis.call('HLEN', prefix .. 'members')))
  end
end
return table.concat(parts)
