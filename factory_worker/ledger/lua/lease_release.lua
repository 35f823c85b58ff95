--[[ lease_release: free the loop lease by run id (compare-and-delete, never a plain DEL).
KEYS: loop_lease
ARGV: run_id
REPLIES: ok not-held
Returns {'ok'} released | {'not-held'} the lease is not held by run_id ]]
if redis.call('GET', K.loop_lease) == A.run_id then
  redis.call('DEL', K.loop_lease)
  return {'ok'}
end
return {'not-held'}
