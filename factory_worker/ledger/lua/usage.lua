--[[ usage: add one usage line of a running agent (a delta) to its issue's sums and the fleet's day, and
compare each sum with its budget in the same step: the add and the compare are one atomic script, so agents
racing past a budget each see every line counted before theirs, and each overshoots by at most its own line.
KEYS: usage(issue) spend(day)
ARGV: issue day cost_usd tokens wall_s lines malformed issue_usd issue_wall_s day_usd spend_ttl_ms
REPLIES: ok
A budget of 0 is none. Not fenced: what an agent spent is spent, whoever holds the claim now.
Returns {'ok', issue_cost, issue_wall_s, day_cost, over}: over is '' (within every budget), 'issue-usd',
'issue-wall' (the issue's budgets: reached or passed) or 'day' (the fleet's day budget reached or passed) ]]
local ic = tonumber(redis.call('HINCRBYFLOAT', K.usage, 'cost_usd', A.cost_usd))
local iw = tonumber(redis.call('HINCRBYFLOAT', K.usage, 'wall_s', A.wall_s))
redis.call('HINCRBY', K.usage, 'tokens', A.tokens)
redis.call('HINCRBY', K.usage, 'lines', A.lines)
redis.call('HINCRBY', K.usage, 'malformed', A.malformed)
local dc = tonumber(redis.call('HINCRBYFLOAT', K.spend, 'cost_usd', A.cost_usd))
redis.call('HINCRBY', K.spend, 'tokens', A.tokens)
redis.call('HINCRBY', K.spend, 'lines', A.lines)
redis.call('PEXPIRE', K.spend, A.spend_ttl_ms)
local over = ''
local b_cost, b_wall, b_day = tonumber(A.issue_usd), tonumber(A.issue_wall_s), tonumber(A.day_usd)
if b_cost > 0 and ic >= b_cost then over = 'issue-usd'
elseif b_wall > 0 and iw >= b_wall then over = 'issue-wall'
elseif b_day > 0 and dc >= b_day then over = 'day' end
return {'ok', tostring(ic), tostring(iw), tostring(dc), over}
