-- Records outcomes and releases leases. A lease that expired (its job was
-- handed out again) records nothing but what the attempt said about the
-- endpoint. ARGV: 3 breaker 'rate min_requests window consecutive cool
-- max_cool disable_after' (ms), 4 disable reason, 5 max hold (ms),
-- 6 n completions, then per completion: lease, n effects, effects:
--   'E' app part job | 'S' delay app part job | 'D' letter | 'C' stat |
--   'H' app endpoint signal arg   (signal: ok, fail, slow (arg ms), off (arg reason))
-- Returns breaker changes: app, endpoint, state triples.
local r, mr, win, consec, cool, max_cool, disable =
  string.match(ARGV[3], '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
r, mr, win, consec = tonumber(r), tonumber(mr), tonumber(win), tonumber(consec)
cool, max_cool, disable = tonumber(cool), tonumber(max_cool), tonumber(disable)
local disable_reason, max_hold = ARGV[4], tonumber(ARGV[5])
local changes = {}

local function health(app, ep, signal, arg)
  local k = ep_key(app, ep)
  if signal == 'slow' then
    hold(app, ep, NOW + math.min(tonumber(arg), max_hold), false)
    return
  end
  local before = redis.call('HGET', k, 'state') or 'closed'
  local after = before
  if signal == 'off' then
    redis.call('HSET', k, 'state', 'disabled', 'reason', arg)
    redis.call('HDEL', k, 'probe')
    after = 'disabled'
    unhold(app, ep)
  elseif signal == 'ok' then
    count_answer(k, win, false)
    redis.call('HDEL', k, 'cf', 'since')
    if before == 'open' or before == 'half' then
      redis.call('HDEL', k, 'state', 'cool', 'probe')
      after = 'closed'
      unhold(app, ep)
    end
  elseif signal == 'fail' then
    count_answer(k, win, true)
    local cf = redis.call('HINCRBY', k, 'cf', 1)
    local since = tonumber(redis.call('HGET', k, 'since'))
    if not since then
      since = NOW
      redis.call('HSET', k, 'since', NOW)
    end
    if before ~= 'disabled' and disable > 0 and NOW - since >= disable then
      redis.call('HSET', k, 'state', 'disabled', 'reason', disable_reason)
      redis.call('HDEL', k, 'probe')
      after = 'disabled'
      unhold(app, ep)
    elseif before == 'half' then
      local c = math.min(math.max((tonumber(redis.call('HGET', k, 'cool')) or 0) * 2, cool), max_cool)
      redis.call('HSET', k, 'state', 'open', 'cool', c)
      after = 'open'
      hold(app, ep, NOW + c, true)
    elseif before == 'closed' then
      local n, failed = window_counts(k, win)
      if (r > 0 and n >= math.max(mr, 1) and failed >= r * n) or (consec > 0 and cf >= consec) then
        redis.call('HSET', k, 'state', 'open', 'cool', cool)
        after = 'open'
        hold(app, ep, NOW + cool, true)
      end
    end
  end
  refresh_busy(app, ep)
  if after ~= before then
    changes[#changes + 1] = app
    changes[#changes + 1] = ep
    changes[#changes + 1] = after
  end
end

local counts = {}
local i = 7
for _ = 1, tonumber(ARGV[6]) do
  local lease, n = ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local v = redis.call('HGET', LEASED, lease)
  local live = redis.call('ZREM', LEASES, lease) == 1 and v
  if v then redis.call('HDEL', LEASED, lease) end
  for _ = 1, n do
    local kind = ARGV[i]
    if kind == 'E' then
      if live then push(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], false) end
      i = i + 4
    elseif kind == 'S' then
      if live then
        local seq = redis.call('INCR', P .. 'seq')
        redis.call('ZADD', DELAYED, NOW + tonumber(ARGV[i + 1]),
          seq .. '\n' .. ARGV[i + 2] .. '|' .. ARGV[i + 3] .. '\n' .. ARGV[i + 4])
      end
      i = i + 5
    elseif kind == 'D' then
      if live then redis.call('XADD', DLQ, '*', 'dead', ARGV[i + 1]) end
      i = i + 2
    elseif kind == 'C' then
      if live then counts[ARGV[i + 1]] = (counts[ARGV[i + 1]] or 0) + 1 end
      i = i + 2
    elseif kind == 'H' then
      health(ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4])
      i = i + 5
    else
      return redis.error_reply('unknown effect ' .. tostring(kind))
    end
  end
  -- A half-open probe came back without closing or reopening the breaker
  -- (a plugin dropped it, say): let the next probe go.
  if v then
    local app, part = unpack_entry(v)
    if part ~= '' then
      local k = ep_key(app, part)
      if redis.call('HGET', k, 'probe') == lease then
        redis.call('HDEL', k, 'probe')
        if redis.call('HGET', k, 'state') == 'half' then unhold(app, part) end
      end
    end
  end
end
for name, n in pairs(counts) do redis.call('HINCRBY', STATS, name, n) end
return changes
