--[[ queue_tasks: record a batch of agent tasks about to be sent (the shared queue_task: state queued, in
K.queued) and add `counts` to the counters, in one round trip (loop.dispatch_claims).
KEYS: counters queued agent_task(task_id)*
ARGV: run_id sent_ms record_ttl_ms counts claims task_id*
counts: JSON object counter -> increment; claims: JSON list of [issue, token], one per task_id, in order.
REPLIES: ok
Returns {'ok'} ]]
local n = #ARGV - A_N
local claims = cjson.decode(A.claims)
for i = 1, n do
  queue_task(KEYS[K_N + (i - 1) * K_E + 1], ARGV[A_N + i], claims[i][1], claims[i][2], A.run_id, A.sent_ms,
             A.record_ttl_ms)
end
for field, by in pairs(cjson.decode(A.counts)) do
  if by ~= 0 then redis.call('HINCRBY', K.counters, field, by) end
end
return {'ok'}
