-- KEYS: 1 inbox, 2 im:epoch (on a cluster, the slot's).  ARGV: 1 after seq,
--       2 limit, 3 the bodies' key prefix (on a cluster, the slot's;
--       default im:m:), 4 on a cluster, the slot's bodies index.
-- On a cluster the bodies are read with the bodies index as one more key
-- of the MGET: while the slot migrates, a read of several keys some of
-- which are elsewhere is refused (the gate retries), where a read of one
-- body not moved yet would answer nil, taken for a body gone.
-- Returns {epoch or nil, packed (seq, outgoing, body, seq, outgoing, ...)}.
local limit = tonumber(ARGV[2])
local bodyPrefix = ARGV[3] or 'im:m:'
local parts = {}
local n = 0
local low = '(' .. ARGV[1]
while n < limit do
  local page = redis.call('ZRANGEBYSCORE', KEYS[1], low, '+inf', 'LIMIT', 0,
                          math.min(limit - n, 500))
  if #page == 0 then
    break
  end
  local keys = {}
  for i, member in ipairs(page) do
    keys[i] = bodyPrefix .. string.match(member, '^%d+:(%d+):')
  end
  if ARGV[4] then
    keys[#keys + 1] = ARGV[4]
  end
  local bodies = redis.call('MGET', unpack(keys))
  for i, member in ipairs(page) do
    if bodies[i] then
      local seq, outgoing = string.match(member, '^(%d+):%d+:(%d):')
      put(parts, seq)
      put(parts, outgoing)
      put(parts, bodies[i])
      n = n + 1
    end
  end
  low = '(' .. string.match(page[#page], '^(%d+):')
end
return {redis.call('GET', KEYS[2]), table.concat(parts)}
