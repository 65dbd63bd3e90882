-- Answers one search of one tenant and type: the criteria are AND-ed, each criterion's
-- alternatives OR-ed; matches come in id order (bytewise), a page at a time.
--
-- KEYS[1]: the type's live set (`lu:` sorted set), which also names the tenant's hash slot.
-- ARGV[1]: the tenant's key base. ARGV[2]: the plan (JSON) {rt, criteria, after, limit}, where
-- an alternative is {s = key} (set members), {l = key, min, max} (a lexical range of
-- `value\0id` members), {z = key, min, max} (a score range) or {id = id} (a live document).
-- Returns {total, id, version, last_updated, body, ...} for up to `limit` matches after `after`;
-- with `limit` 0, just the total.
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

-- A single set answers a count by itself.
local only = plan.criteria[1]
if plan.limit == 0 and #plan.criteria == 1 and #only == 1 and only[1].s then
  return {redis.call('SCARD', base .. only[1].s)}
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
  if plan.limit == 0 then
    return {redis.call('ZCARD', KEYS[1])}
  end
  matched = {}
  for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    matched[id] = true
  end
end

local total = 0
for _ in pairs(matched) do
  total = total + 1
end
local out = {total}
if plan.limit == 0 then
  return out
end

local function emit(id)
  local d = redis.call('HMGET', base .. 'd:' .. plan.rt .. ':' .. id, 'v', 'lu', 'b')
  out[#out + 1] = id
  out[#out + 1] = d[1]
  out[#out + 1] = d[2]
  out[#out + 1] = d[3]
end

local n = 0
if total <= 256 then
  -- Few matches: sort them.
  local ids = {}
  for id in pairs(matched) do
    ids[#ids + 1] = id
  end
  table.sort(ids, before)
  for _, id in ipairs(ids) do
    if n >= plan.limit then
      break
    end
    if plan.after == '' or before(plan.after, id) then
      emit(id)
      n = n + 1
    end
  end
else
  -- Many: walk the type's ids in order (a lexical sorted set, bytewise) from the cursor and
  -- keep the matches, until the page is full.
  local from = plan.after == '' and '-' or '(' .. plan.after
  while n < plan.limit do
    local chunk = redis.call('ZRANGEBYLEX', base .. 'ids:' .. plan.rt, from, '+', 'LIMIT', 0, 512)
    if #chunk == 0 then
      break
    end
    for _, id in ipairs(chunk) do
      if matched[id] then
        emit(id)
        n = n + 1
        if n >= plan.limit then
          break
        end
      end
    end
    from = '(' .. chunk[#chunk]
  end
end
return out
