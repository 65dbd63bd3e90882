-- Reads what a (tenant, type) holds in some segments, for a deep scrub: each segment's
-- maintained digest and, for every id its membership set lists, the document's fields as they
-- are. Nothing is trusted or changed; the caller hashes the bodies again.
--
-- ARGV: base (`prefix:{tenant}:`), type, then the segment numbers.
-- Returns, per segment: {segment, maintained digest or '', rows}, a row being
-- {id, 'ok', v, e, d, b, lu} for a hash, {id, 'missing'} for no key at all, and
-- {id, 'wrongtype'} for a key that is not a hash (garbage written over a document).
local base, rt = ARGV[1], ARGV[2]
local out = {}
for i = 3, #ARGV do
  local seg = ARGV[i]
  local rows = {}
  for _, id in ipairs(redis.call('SMEMBERS', base .. 'm:' .. rt .. ':' .. seg)) do
    local doc = base .. 'd:' .. rt .. ':' .. id
    local kind = redis.call('TYPE', doc).ok
    if kind == 'none' then
      rows[#rows + 1] = {id, 'missing'}
    elseif kind ~= 'hash' then
      rows[#rows + 1] = {id, 'wrongtype'}
    else
      local f = redis.call('HMGET', doc, 'v', 'e', 'd', 'b', 'lu')
      rows[#rows + 1] = {id, 'ok', f[1] or '', f[2] or '', f[3] or '', f[4] or '', f[5] or ''}
    end
  end
  out[#out + 1] = {seg, redis.call('HGET', base .. 'g:' .. rt, seg) or '', rows}
end
return out
