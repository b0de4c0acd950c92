-- Endpoint states. ARGV: 3 breaker window (ms), 4 n, then app, endpoint pairs.
-- Returns per endpoint: state, waiting, requests, failures, consecutive,
-- failing since, hold, reason ('' when absent), rate-limited waits.
local window = tonumber(ARGV[3])
local out = {}
for i = 5, 4 + 2 * tonumber(ARGV[4]), 2 do
  local app, ep = ARGV[i], ARGV[i + 1]
  local k = ep_key(app, ep)
  local f = redis.call('HMGET', k, 'state', 'cf', 'since', 'hold', 'reason', 'rlw')
  local n, failed = window_counts(k, window)
  local h = tonumber(f[4]) or 0
  if h <= NOW then h = 0 end
  out[#out + 1] = f[1] or ''
  -- Waiting: in the partition, and behind their ordering keys.
  out[#out + 1] = redis.call('LLEN', list_key(app, ep))
    + (tonumber(redis.call('HGET', keys_key(app, ep), 'n')) or 0)
  out[#out + 1] = n
  out[#out + 1] = failed
  out[#out + 1] = tonumber(f[2]) or 0
  out[#out + 1] = tonumber(f[3]) or 0
  out[#out + 1] = h
  out[#out + 1] = f[5] or ''
  out[#out + 1] = tonumber(f[6]) or 0
end
return out
