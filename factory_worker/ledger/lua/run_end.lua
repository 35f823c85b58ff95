--[[ run_end: end a run exactly once.
KEYS: run(run_id)
ARGV: run_id status reason now_ms
REPLIES: ok ended
status is one of RunStatus (finished, stopping, killed, failed, abandoned).
Returns {'ok'} this call ended the run | {'ended'} it had already ended (or does not exist) ]]
if redis.call('HGET', K.run, 'status') ~= 'running' then return {'ended'} end
redis.call('HSET', K.run, 'status', A.status, 'reason', A.reason, 'finished_ms', A.now_ms)
return {'ok'}
