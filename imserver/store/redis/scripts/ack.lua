-- KEYS: none, or on a cluster one key of the first user's slot (it routes
--       the call; the other users may be of other slots the same primary
--       serves: Redis lets a script touch those).
-- ARGV: 1 now ms, then (user tag hex, device id, seq) triples.
-- A cursor only ever rises, so writing one again is harmless: a cursor
-- whose key the node refuses (its slot moved, or is migrating and the key
-- is not there) is skipped and reported, and the gate writes it again on
-- its own, routed by its key (store.py).
-- Returns {cursors written, then the number (1, 2, ...) of each triple
-- refused}.
local function greater(a, b)
  if #a ~= #b then
    return #a > #b
  end
  return a > b
end
local out = {0}
for i = 2, #ARGV, 3 do
  local key = 'im:{u:' .. ARGV[i] .. '}:cursors'
  local seq = ARGV[i + 2]
  local old = redis.pcall('HGET', key, ARGV[i + 1])
  if type(old) == 'table' and old.err then
    out[#out + 1] = (i + 1) / 3
  else
    if old then
      local oldSeq = string.match(old, '^(%d+):')
      if not greater(seq, oldSeq) then
        seq = oldSeq
      end
    end
    redis.call('HSET', key, ARGV[i + 1], seq .. ':' .. ARGV[1])
    out[1] = out[1] + 1
  end
end
return out
