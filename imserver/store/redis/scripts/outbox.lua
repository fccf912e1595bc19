-- The webhook outbox's helpers (keys in keys.py): store.py puts this, after
-- prelude.lua, in front of the scripts that record events.  Only two
-- functions are made per script run; the helpers inside outboxLib are made
-- only when an event is recorded, so a script that records none costs the
-- same as before.
--
-- A script that reports a change (deliver, createGroup, deleteGroup,
-- setMembers, removeMembers) is passed, when the store records that kind of
-- event and only then, the three outbox keys last in KEYS (im:outbox,
-- im:outbox:last, im:outbox:store) and seven values last in ARGV: the
-- limit, a new store id, now ms, the event's type and ordering key, and its
-- data JSON before and after the list of uids the script fills in (the
-- recipients, the members added or removed; '' after when there is none).
-- outboxArgs(n) (n: the script's own KEYS) returns that event, or nil, and
-- the index of the script's own last ARGV; event.record(uids) records it.
--
-- An entry is the stream entry '<id>-0', fields c (created ms), t (type),
-- k (ordering key), d (data).  id = max(last id + 1, now ms * 1000): ids
-- increase, and even if Redis lost im:outbox:last they start again above
-- the ids given before (below 2^53, see prelude.lua, until the year 2255).
-- The store id is set (NX) with the first event.
local function outboxLib()
  local lib = {}
  local function jsonEscape(c)
    if c == '"' or c == '\\' then
      return '\\' .. c
    end
    local short = string.find('\b\f\n\r\t', c, 1, true)
    if short then
      return '\\' .. string.sub('bfnrt', short, short)
    end
    return string.format('\\u%04x', string.byte(c))
  end
  -- A JSON string, byte for byte as Python's json.dumps(ensure_ascii=False).
  function lib.jsonString(s)
    return '"' .. string.gsub(s, '[%z\1-\31"\\]', jsonEscape) .. '"'
  end
  -- Keep an event if there is room (o: stream, last, store, limit,
  -- storeId).  Returns 1 if kept, 0 if the outbox is full.
  function lib.add(o, kind, key, now, data)
    if redis.call('XLEN', o.stream) >= o.limit then
      return 0
    end
    redis.call('SET', o.store, o.storeId, 'NX')
    local id = math.max(tonumber(redis.call('GET', o.last) or '0') + 1, now * 1000)
    local fields = {'c', fmt(now), 't', kind, 'k', key, 'd', data}
    local added = redis.pcall('XADD', o.stream, fmt(id) .. '-0', unpack(fields))
    if type(added) == 'table' and added.err then
      -- The stream holds a larger id than im:outbox:last (a lost or edited
      -- key): continue above the stream's.
      local info = redis.call('XINFO', 'STREAM', o.stream)
      for i = 1, #info, 2 do
        if info[i] == 'last-generated-id' then
          id = math.max(id, tonumber(string.match(info[i + 1], '^(%d+)')) + 1)
        end
      end
      redis.call('XADD', o.stream, fmt(id) .. '-0', unpack(fields))
    end
    redis.call('SET', o.last, fmt(id))
    return 1
  end
  return lib
end
local function outboxArgs(ownKeys)
  if #KEYS <= ownKeys then
    return nil, #ARGV
  end
  local lib = outboxLib()
  local n = #ARGV
  local o = {stream = KEYS[#KEYS - 2], last = KEYS[#KEYS - 1], store = KEYS[#KEYS],
             limit = tonumber(ARGV[n - 6]), storeId = ARGV[n - 5]}
  -- Record the event, its data completed with the JSON strings of uids (an
  -- array, or nil for none).  Returns 1 if kept, 0 if the outbox is full.
  function o.record(uids)
    local items = {}
    for i, uid in ipairs(uids or {}) do
      items[i] = lib.jsonString(uid)
    end
    return lib.add(o, ARGV[n - 3], ARGV[n - 2], tonumber(ARGV[n - 4]),
                   ARGV[n - 1] .. table.concat(items, ',') .. ARGV[n])
  end
  return o, n - 7
end
