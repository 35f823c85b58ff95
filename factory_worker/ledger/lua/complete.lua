--[[ complete: the holder marks its issue done, permanently (compare-and-set on the token).
KEYS: claim(issue) inflight started fences done_bucket(issue) done done_count backoff attempts errors counters stages(issue) stage_history(issue) outbox
ARGV: token issue outbox summary pr_url branch no_changes
REPLIES: ok gone held
Returns {'ok', done_marker} done | {'gone'} no live claim | {'held', current_token} held by another token
The fence moves into the done marker "<fence>:<completed_ms>": one field of the issue's done bucket (a small
hash; done_count counts the new ones; the legacy single done hash is only read). summary, pr_url, branch,
no_changes ('1' or ''): what the dispatch made in its workspace, on the done event when not empty (the
tracker's comment shows them). ]]
local stale = not_holder(A.token)
if stale then return stale end
local marker = (string.match(A.token, '^(%d+):') or '0') .. ':' .. now_ms()
local attempt = tonumber(redis.call('HGET', K.attempts, A.issue) or '0') + 1
end_claim(A.issue)
if redis.call('HSET', K.done_bucket, A.issue, marker) == 1 and redis.call('HEXISTS', K.done, A.issue) == 0 then
  redis.call('INCR', K.done_count)
end
redis.call('HDEL', K.fences, A.issue)
redis.call('ZREM', K.backoff, A.issue)
redis.call('HDEL', K.attempts, A.issue)
redis.call('HDEL', K.errors, A.issue)
record_step('done')  -- a staged attempt's last step, kept in its history
redis.call('DEL', K.stages)  -- a staged dispatch's progress ends with its attempt
redis.call('HINCRBY', K.counters, 'completed', 1)
local fields = {'attempt', attempt}
for _, name in ipairs({'summary', 'pr_url', 'branch', 'no_changes'}) do
  if A[name] ~= '' then fields[#fields + 1] = name; fields[#fields + 1] = A[name] end
end
emit('done', A.issue, A.token, fields)
return {'ok', marker}
