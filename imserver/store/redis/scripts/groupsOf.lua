-- KEYS: 1 the user's groups.  ARGV: 1 uid.
-- Returns packed (group id, name, created, role, member count, ...)
-- (groupEntry.lua).
local parts = {}
for _, gid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  groupEntry(parts, gid, ARGV[1])
end
return table.concat(parts)
