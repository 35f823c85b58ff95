--[[ fleet_slots: the live workers' agent slots now, counted exactly as claim.lua counts them (the shared
live_slots), for loop-status. Read-only: expired entries are left for claim.lua to prune.
KEYS: slots
ARGV:
REPLIES: ok
Returns {'ok', slots} ]]
return {'ok', live_slots(now_ms(), false)}
