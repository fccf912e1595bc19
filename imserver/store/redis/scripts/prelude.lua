-- Helpers that store.py puts in front of the scripts that use them.
--
-- Lua numbers are doubles: seqs and ids stay below 2^53 (the seq floor is
-- about 1.8e15 now and reaches 2^53 around the year 2255) and go to Redis
-- as fmt(n) strings, never through tostring, which rounds to 14 digits.
-- put packs an item as <length>:<bytes> (unpack in store.py splits them):
-- one bulk reply instead of a long array, which txredisapi parses one
-- element per reactor iteration.
local function hex(s)
  local parts = {}
  for i = 1, #s, 100 do
    local j = math.min(i + 99, #s)
    parts[#parts + 1] = string.format(string.rep('%02x', j - i + 1), string.byte(s, i, j))
  end
  return table.concat(parts)
end
local function fmt(n)
  return string.format('%d', n)
end
local function put(parts, s)
  parts[#parts + 1] = #s .. ':' .. s
end
local function timeFloor()
  local t = redis.call('TIME')
  local us = tonumber(t[2])
  return tonumber(t[1]) * 1000000 + us - us % 1000
end
