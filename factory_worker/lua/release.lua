--[[ release: the holder frees its claim without counting an attempt (e.g. reason "interrupted").
KEYS: claim(issue) inflight started counters
ARGV: token issue reason
REPLIES: ok gone held
Returns {'ok', reason} released | {'gone'} no live claim | {'held', current_token} held by another token ]]
local stale = not_holder(A.token)
if stale then return stale end
end_claim(A.issue)
redis.call('HINCRBY', K.counters, 'released', 1)
if A.reason ~= '' then redis.call('HINCRBY', K.counters, 'released_' .. A.reason, 1) end
return {'ok', A.reason}
