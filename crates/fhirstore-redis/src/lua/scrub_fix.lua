-- Repairs one segment after a deep scrub, atomically: removes the documents the scrub found
-- lost, corrupted or unreadable (with their index entries, where they can still be read), then
-- recomputes the segment's digest from the element hashes of the documents left and moves the
-- root and group digests by the difference. The ordinary reconcile then finds the removed keys
-- missing and repairs them from the primary through apply.lua.
--
-- ARGV: base, type, segment, then pairs (id, the version the scrub saw, '' when the key was
-- missing or not a hash). A document whose version moved since is left alone: a newer apply
-- rewrote it. Returns {documents removed, 1 if the digest changed else 0}.
local base, rt, seg = ARGV[1], ARGV[2], ARGV[3]
local members = base .. 'm:' .. rt .. ':' .. seg
local removed = 0

for i = 4, #ARGV, 2 do
  local id, seen = ARGV[i], ARGV[i + 1]
  local doc = base .. 'd:' .. rt .. ':' .. id
  local kind = redis.call('TYPE', doc).ok
  local evict
  if kind == 'none' then
    evict = seen == ''
  elseif kind ~= 'hash' then
    evict = true
  else
    local v = redis.call('HGET', doc, 'v')
    evict = (v or '') == seen
  end
  if evict then
    if kind == 'hash' then
      local ix = redis.call('HGET', doc, 'ix')
      local ok, entries = pcall(cjson.decode, ix or '[]')
      if ok and type(entries) == 'table' then
        for _, entry in ipairs(entries) do
          if type(entry) == 'table' and type(entry[2]) == 'string' then
            local key = base .. entry[2]
            if entry[1] == 'l' and entry[3] then
              redis.call('ZREM', key, entry[3])
            elseif entry[1] == 'z' then
              redis.call('ZREM', key, id)
            else
              redis.call('SREM', key, id)
            end
          end
        end
      end
    end
    -- The live-set indexes, whatever became of `ix`.
    redis.call('ZREM', base .. 'lu:' .. rt, id)
    redis.call('ZREM', base .. 'ids:' .. rt, id)
    redis.call('DEL', doc)
    redis.call('SREM', members, id)
    removed = removed + 1
  end
end

local function words(text)
  local out = {}
  for n in string.gmatch(text, '[^:]+') do
    out[#out + 1] = tonumber(n)
  end
  return out
end

local fresh = {0, 0, 0, 0, 0}
for _, id in ipairs(redis.call('SMEMBERS', members)) do
  local doc = base .. 'd:' .. rt .. ':' .. id
  if redis.call('TYPE', doc).ok == 'hash' then
    local e = redis.call('HGET', doc, 'e')
    if e then
      local w = words(e)
      if #w == 4 then
        for k = 1, 4 do
          fresh[k] = bit.bxor(fresh[k], w[k])
        end
        fresh[5] = fresh[5] + 1
      end
    end
  end
end

local digests = base .. 'g:' .. rt
local groups = base .. 'gg:' .. rt
local old = {0, 0, 0, 0, 0}
local cur = redis.call('HGET', digests, seg)
if cur then
  old = words(cur)
end
local changed = 0
for k = 1, 5 do
  if old[k] ~= fresh[k] then
    changed = 1
  end
end
if changed == 1 then
  local delta = {}
  for k = 1, 4 do
    delta[k] = bit.bxor(old[k], fresh[k])
  end
  delta[5] = fresh[5] - old[5]
  local function put(hash, field, d)
    if d[5] == 0 then
      redis.call('HDEL', hash, field)
    else
      redis.call('HSET', hash, field, string.format('%d:%d:%d:%d:%d', d[1], d[2], d[3], d[4], d[5]))
    end
  end
  local function shift(hash, field)
    local d = {0, 0, 0, 0, 0}
    local c = redis.call('HGET', hash, field)
    if c then
      d = words(c)
    end
    for k = 1, 4 do
      d[k] = bit.bxor(d[k], delta[k])
    end
    d[5] = d[5] + delta[5]
    put(hash, field, d)
  end
  put(digests, seg, fresh)
  shift(digests, 'r')
  -- 16 segments per group (fhirstore_core::digest::GROUP_SHIFT).
  shift(groups, tostring(math.floor(tonumber(seg) / 16)))
end
return {removed, changed}
