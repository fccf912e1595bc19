-- groupEntry(parts, gid, uid): put the group's id, name, created, the
-- user's role and the member count in parts, if the group exists and the
-- user is a member (groupsOf.lua, groupOf.lua).
local function groupEntry(parts, gid, uid)
  local prefix = 'im:{g:' .. hex(gid) .. '}:'
  local info = redis.call('HMGET', prefix .. 'info', 'name', 'created')
  local member = redis.call('HGET', prefix .. 'members', uid)
  if info[1] and member then
    put(parts, gid)
    put(parts, info[1])
    put(parts, info[2])
    put(parts, string.match(member, '^(%d+):'))
    put(parts, tostring(redis.call('HLEN', prefix .. 'members')))
  end
end
