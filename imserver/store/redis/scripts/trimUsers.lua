-- KEYS: none, or on a cluster one key of the users' slot (for routing).
-- ARGV: 1 oldest ms kept, 2 max count, 3 clock skew ms, 4 scan limit,
--       5... user tags (hex).
-- Returns {removed, tag, ...}: the tags listed have more old entries.
local oldest = tonumber(ARGV[1])
local maxCount = tonumber(ARGV[2])
local horizon = oldest + tonumber(ARGV[3])
local limit = tonumber(ARGV[4])
local out = {0}
local function removeAll(command, key, items)
  local n = 0
  for i = 1, #items, 1000 do
    n = n + redis.call(command, key, unpack(items, i, math.min(i + 999, #items)))
  end
  return n
end
for i = 5, #ARGV do
  local prefix = 'im:{u:' .. ARGV[i] .. '}:'
  local inbox, cursors = prefix .. 'inbox', prefix .. 'cursors'
  local acked = nil
  local stale = {}
  local all = redis.call('HGETALL', cursors)
  for j = 1, #all, 2 do
    local seq, ms = string.match(all[j + 1], '^(%d+):(%d+)$')
    seq = tonumber(seq)
    if acked == nil or seq < acked then
      acked = seq
    end
    if tonumber(ms) < oldest then
      stale[#stale + 1] = all[j]
    end
  end
  local old = {}
  local start = 0
  local more = false
  while true do
    local page = redis.call('ZRANGE', inbox, start, start + 99)
    local stop = #page == 0
    for _, member in ipairs(page) do
      local created = tonumber(string.match(member, ':(%d+)$'))
      if created < oldest then
        old[#old + 1] = member
      elseif created >= horizon then
        stop = true
        break
      end
    end
    if stop then
      break
    end
    start = start + 100
    if start >= limit then
      -- Finish in another call, if this one made progress.
      more = #old > 0
      break
    end
  end
  out[1] = out[1] + removeAll('ZREM', inbox, old)
  if more then
    out[#out + 1] = ARGV[i]
  elseif redis.call('ZCARD', inbox) > maxCount then
    local head = tonumber(redis.call('GET', prefix .. 'head') or '0')
    local cutoff = math.min(acked or 0, head - maxCount)
    if cutoff > 0 then
      out[1] = out[1] + redis.call('ZREMRANGEBYSCORE', inbox, '-inf', string.format('%d', cutoff))
    end
  end
  if not more then
    removeAll('HDEL', cursors, stale)
  end
end
return out
