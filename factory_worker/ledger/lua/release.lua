--[[ release: the holder frees its claim without counting an attempt (e.g. reason "interrupted").
KEYS: claim(issue) inflight started counters outbox
ARGV: token issue reason outbox
REPLIES: ok gone held
Returns {'ok', reason} released | {'gone'} no live claim | {'held', current_token} held by another token ]]
local stale = not_holder(A.token)
if stale then return stale end
local had_started = redis.call('HGET', K.started, A.issue) == A.token
end_claim(A.issue)
redis.call('HINCRBY', K.counters, 'released', 1)
if A.reason ~= '' then redis.call('HINCRBY', K.counters, 'released_' .. A.reason, 1) end
-- only a claim whose agent had started was announced (dispatched), so only its end is reported
if had_started then emit('released', A.issue, A.token, {'reason', A.reason}) end
return {'ok', A.reason}
