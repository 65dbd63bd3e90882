-- Rebuilds one (tenant, type)'s group digests from its segment digests, atomically: the repair
-- of a group hash that disagrees with the root (written before groups existed, or damaged).
--
-- KEYS[1]: the digest hash (`g:{type}`: `r` and one field per segment); KEYS[2]: the group hash
-- (`gg:{type}`). Both share the tenant's hash slot. Returns the number of groups written.
local all = redis.call('HGETALL', KEYS[1])
local groups = {}
for i = 1, #all, 2 do
  local field = all[i]
  if field ~= 'r' then
    -- 16 segments per group (fhirstore_core::digest::GROUP_SHIFT).
    local g = math.floor(tonumber(field) / 16)
    local d = groups[g] or {0, 0, 0, 0, 0}
    local k = 1
    for n in string.gmatch(all[i + 1], '[^:]+') do
      if k <= 4 then
        d[k] = bit.bxor(d[k], tonumber(n))
      else
        d[5] = d[5] + tonumber(n)
      end
      k = k + 1
    end
    groups[g] = d
  end
end
redis.call('DEL', KEYS[2])
local written = 0
for g, d in pairs(groups) do
  if d[5] ~= 0 then
    redis.call('HSET', KEYS[2], tostring(g),
      string.format('%d:%d:%d:%d:%d', d[1], d[2], d[3], d[4], d[5]))
    written = written + 1
  end
end
return written
