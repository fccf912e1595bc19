-- KEYS: 1 info, 2 members.
-- Returns {'ok', packed (uid, role:joined, ...)} or {'notfound'}.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'notfound'}
end
local parts = {}
for _, value in ipairs(redis.call('HGETALL', KEYS[2])) do
  put(parts, value)
end
return {'ok', table.concat(parts)}
