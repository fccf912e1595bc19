-- Redis Cluster mode: one group of groupsOf, on the group's slot.
-- KEYS: 1 the group's info.  ARGV: 1 uid, 2 group id.
-- Returns packed (group id, name, created, role, member count), or '' if
-- the group is gone or the user not a member (groupEntry.lua).
local parts = {}
groupEntry(parts, ARGV[2], ARGV[1])
return table.concat(parts)
