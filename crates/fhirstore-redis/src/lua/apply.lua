-- Applies one change to one resource, atomically: version compare-and-set, document, index
-- entries (the old version's removed), digest XOR (root, segment and group) and segment
-- membership.
--
-- KEYS[1]: the document hash. Every other key is derived from ARGV[1], the tenant's key base
-- (`prefix:{tenant}:`), so all of them share the tenant's hash slot on Redis Cluster.
-- ARGV: base, type, id, version, last_updated (microseconds), deleted ('0' or '1'), body,
-- e0..e3 (the element hash as four signed 32-bit words), segment, index entries (JSON), and
-- '1' for a repair (see below).
-- An index entry is {kind, key[, member]}: 's' adds the id to a set, 'z' adds it to a sorted
-- set with `member` as its score, 'l' adds `member` to a sorted set at score 0 (a lexical range
-- index). Scores travel as strings: Lua numbers would lose microseconds.
-- Returns 1 when the change moved the key forward, 0 when it was not newer.
local doc = KEYS[1]
local base, rt, id = ARGV[1], ARGV[2], ARGV[3]
local held = redis.call('HMGET', doc, 'v', 'e', 'ix')
local e = {tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])}
local e_text = string.format('%d:%d:%d:%d', e[1], e[2], e[3], e[4])
if held[1] then
  local have, want = tonumber(held[1]), tonumber(ARGV[4])
  -- ARGV[14] = '1' is a repair: an equal version with another hash is replaced.
  if have > want or (have == want and (ARGV[14] ~= '1' or held[2] == e_text)) then
    return 0
  end
end

local digests = base .. 'g:' .. rt
local groups = base .. 'gg:' .. rt
local segment = ARGV[12]
-- 16 segments per group (fhirstore_core::digest::GROUP_SHIFT).
local group = tostring(math.floor(tonumber(segment) / 16))

local function words(text)
  local out = {}
  for n in string.gmatch(text, '[^:]+') do
    out[#out + 1] = tonumber(n)
  end
  return out
end

-- Folds an element hash into (or, with delta -1, out of) one digest field: 'r' for the root,
-- the segment number for a segment (both in `digests`), or the group number (in `groups`). A
-- field whose count reaches zero is removed, so only non-empty segments and groups are listed.
local function fold(hash, field, e, delta)
  local d = {0, 0, 0, 0, 0}
  local cur = redis.call('HGET', hash, field)
  if cur then
    d = words(cur)
  end
  for i = 1, 4 do
    d[i] = bit.bxor(d[i], e[i])
  end
  d[5] = d[5] + delta
  if d[5] == 0 then
    redis.call('HDEL', hash, field)
  else
    redis.call('HSET', hash, field, string.format('%d:%d:%d:%d:%d', d[1], d[2], d[3], d[4], d[5]))
  end
end

if held[2] then
  local old = words(held[2])
  fold(digests, 'r', old, -1)
  fold(digests, segment, old, -1)
  fold(groups, group, old, -1)
else
  redis.call('SADD', base .. 'm:' .. rt .. ':' .. segment, id)
  redis.call('SADD', base .. 'types', rt)
end
fold(digests, 'r', e, 1)
fold(digests, segment, e, 1)
fold(groups, group, e, 1)

if held[3] then
  for _, entry in ipairs(cjson.decode(held[3])) do
    local key = base .. entry[2]
    if entry[1] == 'l' then
      redis.call('ZREM', key, entry[3])
    elseif entry[1] == 'z' then
      redis.call('ZREM', key, id)
    else
      redis.call('SREM', key, id)
    end
  end
end
for _, entry in ipairs(cjson.decode(ARGV[13])) do
  local key = base .. entry[2]
  if entry[1] == 'l' then
    redis.call('ZADD', key, 0, entry[3])
  elseif entry[1] == 'z' then
    redis.call('ZADD', key, entry[3], id)
  else
    redis.call('SADD', key, id)
  end
end

redis.call('HSET', doc, 'v', ARGV[4], 'lu', ARGV[5], 'd', ARGV[6],
  'e', e_text, 'ix', ARGV[13])
if ARGV[6] == '1' then
  redis.call('HDEL', doc, 'b')
else
  redis.call('HSET', doc, 'b', ARGV[7])
end
return 1
