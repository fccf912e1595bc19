-- KEYS: 1 info, 2 members.
-- Returns {'ok', name, created, member count} or {'notfound'}.
local info = redis.call('HMGET', KEYS[1], 'name', 'created')
if not info[1] then
  return {'notfound'}
end
return {'ok', info[1], info[2], redis.call('HLEN', KEYS[2])}
