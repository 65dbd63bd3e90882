-- Answers one search of one tenant and type: the criteria are AND-ed, each criterion's
-- alternatives OR-ed; matches come in id order (bytewise), a page at a time.
--
-- KEYS[1]: the type's live set (`lu:` sorted set), which also names the tenant's hash slot.
-- ARGV[1]: the tenant's key base. ARGV[2]: the plan (JSON) {rt, criteria, after, limit}, where
-- an alternative is {s = key} (set members), {l = key, min, max} (a lexical range of
-- `value\0id` members), {z = key, min, max} (a score range) or {id = id} (a live document).
-- Returns {total, id, version, last_updated, body, ...} for up to `limit` matches after `after`.
local base = ARGV[1]
local plan = cjson.decode(ARGV[2])

-- Bytewise order, as the primary's ids sort; Lua's own string order follows the locale.
local function before(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x < y
    end
  end
  return #a < #b
end

local function collect(alt, into)
  if alt.s then
    for _, id in ipairs(redis.call('SMEMBERS', base .. alt.s)) do
      into[id] = true
    end
  elseif alt.l then
    for _, m in ipairs(redis.call('ZRANGEBYLEX', base .. alt.l, alt.min, alt.max)) do
      into[string.match(m, '%z([^%z]*)$')] = true
    end
  elseif alt.z then
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', base .. alt.z, alt.min, alt.max)) do
      into[id] = true
    end
  elseif alt.id then
    if redis.call('HGET', base .. 'd:' .. plan.rt .. ':' .. alt.id, 'd') == '0' then
      into[alt.id] = true
    end
  end
end

local matched = nil
for _, alts in ipairs(plan.criteria) do
  local set = {}
  for _, alt in ipairs(alts) do
    collect(alt, set)
  end
  if matched then
    for id in pairs(matched) do
      if not set[id] then
        matched[id] = nil
      end
    end
  else
    matched = set
  end
end
if not matched then
  matched = {}
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    matched[id] = true
  end
end

local ids = {}
for id in pairs(matched) do
  ids[#ids + 1] = id
end
table.sort(ids, before)
local out = {#ids}
local n = 0
for _, id in ipairs(ids) do
  if n >= plan.limit then
    break
  end
  if plan.after == '' or before(plan.after, id) then
    local d = redis.call('HMGET', base .. 'd:' .. plan.rt .. ':' .. id, 'v', 'lu', 'b')
    out[#out + 1] = id
    out[#out + 1] = d[1]
    out[#out + 1] = d[2]
    out[#out + 1] = d[3]
    n = n + 1
  end
end
return out
