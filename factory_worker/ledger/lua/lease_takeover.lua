--[[ lease_takeover: a kickoff takes the loop lease from a run whose holder (the worker that ran its latest
iteration) is dead, instead of waiting for the lease to expire (compare-and-set on the old run id).
KEYS: loop_lease
ARGV: old_run_id new_run_id lease_ms
REPLIES: ok not-held
Returns {'ok'} the lease now holds new_run_id | {'not-held'} it no longer holds old_run_id (nothing changed) ]]
if redis.call('GET', K.loop_lease) ~= A.old_run_id then return {'not-held'} end
redis.call('SET', K.loop_lease, A.new_run_id, 'PX', A.lease_ms)
return {'ok'}
