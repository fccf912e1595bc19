-- KEYS: none, or on a cluster one key of the users' slot (for routing).
-- ARGV: 1 now ms, then (user tag hex, device id, seq) triples.
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end
for i = 2, #ARGV, 3 do
  local key = 'im:{u:' .. ARGV[i] .. '}:cursors'
  local seq = ARGV[i + 2]
  local old = redis.call('HGET', key, ARGV[i + 1])
  if old then
    local oldSeq = string.match(old, '^(%d+):')
    if not greater(seq, oldSeq) then
      seq = oldSeq
    end
  end
  redis.call('HSET', key, ARGV[i + 1], seq .. ':' .. ARGV[1])
end
return (#ARGV - 1) / 3
