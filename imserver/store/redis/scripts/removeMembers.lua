-- KEYS: 1 info, 2 members.  ARGV: 1 group id, 2... (uid, tag hex) pairs.
-- Returns {'ok', packed removed uids} or {'notfound'}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'notfound'}
end
local removed = {}
for i = 2, #ARGV, 2 do
  if redis.call('HDEL', KEYS[2], ARGV[i]) == 1 then
    put(removed, ARGV[i])
    redis.call('SREM', 'im:{u:' .. ARGV[i + 1] .. '}:groups', ARGV[1])
  end
end
return {'ok', table.concat(removed)}
