-- KEYS: 1 info, 2 members.  ARGV: 1 group id.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'notfound'
end
for _, value in ipairs(redis.call('HVALS', KEYS[2])) do
  local tag = string.match(value, '^%d+:%d+:(%x*)$')
  redis.call('SREM', 'im:{u:' .. tag .. '}:groups', ARGV[1])
end
redis.call('DEL', KEYS[1], KEYS[2])
return 'ok'
