--[[ renew: extend a live claim's lease, only for its holder (compare-and-set on the token).
KEYS: claim(issue) inflight
ARGV: token lease_ms issue
REPLIES: ok gone held
Returns {'ok', lease_end_ms} renewed | {'gone'} no live claim (expired or released)
      | {'held', current_token} held by another token ]]
local stale = not_holder(A.token)
if stale then return stale end
return {'ok', tostring(extend_lease(A.issue, tonumber(A.lease_ms)))}
