--[[ begin: the agent task for a claim starts, at most once per token, and never once the loop is killed
or the task revoked (a redelivered, duplicated, revoked or post-kill message runs nothing).
KEYS[1] claim key   KEYS[2] inflight (zset)   KEYS[3] started (hash issue -> token whose agent started)
KEYS[4] revoked task ids (set)   KEYS[5] loop kill flag (hash)   KEYS[6] agent task record (hash)
KEYS[7] running agent task ids (set)
ARGV[1] token   ARGV[2] lease_ms   ARGV[3] issue   ARGV[4] agent task id   ARGV[5] run id
ARGV[6] worker node name   ARGV[7] worker pid
On start, the agent task is recorded (KEYS[6] fields issue, token, run_id, hostname, worker_pid, state)
and added to KEYS[7], so kill-loop --release-agents and a revoke can find it by task id.
Returns {1, expires_ms} started (lease renewed) | {2, ""} an agent already started for this token
      | {3, "revoked"|"killed"} must not start (the caller releases the claim)
      | {0, ""} no live claim | {-1, current_token} held by another token ]]
local cur = redis.call('GET', KEYS[1])
if not cur then return {0, ''} end
if cur ~= ARGV[1] then return {-1, cur} end
if redis.call('HGET', KEYS[3], ARGV[3]) == ARGV[1] then return {2, ''} end
if redis.call('SISMEMBER', KEYS[4], ARGV[4]) == 1 then return {3, 'revoked'} end
if redis.call('EXISTS', KEYS[5]) == 1 then return {3, 'killed'} end
redis.call('HSET', KEYS[3], ARGV[3], ARGV[1])
redis.call('HSET', KEYS[6], 'issue', ARGV[3], 'token', ARGV[1], 'run_id', ARGV[5], 'hostname', ARGV[6],
           'worker_pid', ARGV[7], 'state', 'running')
redis.call('SADD', KEYS[7], ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(ARGV[2])
redis.call('PEXPIRE', KEYS[1], lease)
redis.call('ZADD', KEYS[2], now + lease, ARGV[3])
return {1, tostring(now + lease)}
