-- Takes up to ARGV[3] jobs fairly, after moving what fell due.
-- ARGV: 3 max, 4 lease ms, 5 n app rooms, then app, room pairs, then
-- n endpoint rooms, then 'app|ep', room pairs, then n intake rooms, then app,
-- room pairs (new events to take at most: the room left at the app's
-- endpoints on this worker; for other apps, one endpoint's cap).
-- Returns {more, next due in ms or -1, n groups, (lease, app, part,
--          disabled, k, job id x k) x n, n apps, (app, k, endpoint x k) x n};
-- the worker reads the jobs (P..'jobs') itself.
local max, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4])

-- 1. What fell due: leases whose worker died (back to the front), retries,
-- holds that end (an open breaker's cool-down is over: half-open).
-- Newest first: each goes to the front, so the oldest ends up first.
local expired = redis.call('ZRANGEBYSCORE', LEASES, '-inf', NOW, 'LIMIT', 0, 100)
for e = #expired, 1, -1 do
  local lease = expired[e]
  redis.call('ZREM', LEASES, lease)
  local set, app, part = lease_parts(lease)
  local jobs = redis.call('SMEMBERS', set)
  redis.call('DEL', set)
  -- Job ids grow with time: in order, they are first in, first out.
  table.sort(jobs, function(a, b) return tonumber(a) < tonumber(b) end)
  if part ~= '' and redis.call('HGET', ep_key(app, part), 'probe') == lease then
    redis.call('HDEL', ep_key(app, part), 'probe')
  end
  if #jobs > 0 then
    redis.call('DECRBY', INFLIGHT, #jobs)
    push_many(app, part, jobs, true)
  end
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', DELAYED, '-inf', NOW, 'LIMIT', 0, 200)) do
  redis.call('ZREM', DELAYED, m)
  local job, app, part = split_entry(m)
  push(app, part, job, false)
end
for _, m in ipairs(redis.call('ZRANGEBYSCORE', HELD, '-inf', NOW, 'LIMIT', 0, 200)) do
  local app, ep = split_bar(m)
  local k = ep_key(app, ep)
  if redis.call('HGET', k, 'state') == 'open' then redis.call('HSET', k, 'state', 'half') end
  unhold(app, ep)
end

-- 2. Parameters: defaults, then what this worker has room for.
local quantum, d_weight, d_appcap, d_epcap = 8, 1, 1000000000, 1000000000
local d = redis.call('HGET', CONF, '_')
if d then
  local a, b, c, e = string.match(d, '^(%S+) (%S+) (%S+) (%S+)$')
  quantum, d_weight, d_appcap, d_epcap = tonumber(a), tonumber(b), tonumber(c), tonumber(e)
end
local app_room, ep_room, weights = {}, {}, {}
local i = 5
for _ = 1, tonumber(ARGV[i]) do
  app_room[ARGV[i + 1]] = tonumber(ARGV[i + 2])
  i = i + 2
end
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  ep_room[ARGV[i + 1]] = tonumber(ARGV[i + 2])
  i = i + 2
end
local intake_room = {}
i = i + 1
for _ = 1, tonumber(ARGV[i]) do
  intake_room[ARGV[i + 1]] = tonumber(ARGV[i + 2])
  i = i + 2
end

local function app_conf(app)
  if weights[app] == nil then
    local c = redis.call('HGET', CONF, 'a:' .. app)
    local w, cap = d_weight, d_appcap
    if c then
      local a, b = string.match(c, '^(%S+) (%S+)$')
      w, cap = tonumber(a), tonumber(b)
    end
    weights[app] = w
    if app_room[app] == nil then app_room[app] = cap end
  end
  return weights[app], app_room[app]
end

local ep_confs = {}
local function ep_conf(app, ep)
  local key = app .. '|' .. ep
  local c = ep_confs[key]
  if c == nil then
    c = { d_epcap, 0, 0, false }
    local s = redis.call('HGET', CONF, 'e:' .. key)
    if s then
      local a, b, e, o = string.match(s, '^(%S+) (%S+) (%S+) ?(%S*)$')
      c = { tonumber(a), tonumber(b), tonumber(e), o == '1' }
    end
    ep_confs[key] = c
    if ep_room[key] == nil then ep_room[key] = c[1] end
  end
  return c, ep_room[key]
end

-- 3. Taking.
-- Taken jobs, grouped: lease, app, partition, disabled reason ('' if not),
-- n, then the n job ids. One lease ('seq|app|part') covers the jobs one
-- take gives from one partition.
local out, groups = {}, 0
local function take_from(app, part, n, disabled)
  if n <= 0 then return 0 end
  local jobs = redis.call('LPOP', list_key(app, part), n)
  if not jobs then return 0 end
  local m = #jobs
  local seq = redis.call('INCR', P .. 'seq')
  local lease = seq .. '|' .. app .. '|' .. part
  redis.call('ZADD', LEASES, NOW + lease_ms, lease)
  call_chunked('SADD', P .. 'lease:' .. seq, jobs, 1000)
  out[#out + 1] = lease
  out[#out + 1] = app
  out[#out + 1] = part
  out[#out + 1] = disabled or ''
  out[#out + 1] = m
  for j = 1, m do out[#out + 1] = jobs[j] end
  groups = groups + 1
  redis.call('DECRBY', COUNT, m)
  redis.call('INCRBY', INFLIGHT, m)
  return m, lease
end

-- One endpoint partition's share of a turn.
local function take_endpoint(app, ep, budget)
  local c, room = ep_conf(app, ep)
  local want = math.min(budget, room)
  if want <= 0 then return 0 end
  local k = ep_key(app, ep)
  local st = redis.call('HMGET', k, 'state', 'probe', 'tat', 'reason', 'olease')
  if st[1] == 'disabled' then
    return take_from(app, ep, want, st[4] or 'endpoint disabled')
  end
  if c[4] then
    -- Ordered: one job in flight fleet-wide; the partition is held until its
    -- outcome is in (or its lease lapses and it goes back to the front).
    local expires = st[5] and redis.call('ZSCORE', LEASES, st[5])
    if expires then
      hold(app, ep, tonumber(expires), true)
      return 0
    end
    want = 1
  end
  local function ordered_take(n, lease)
    if c[4] and n > 0 then
      redis.call('HSET', k, 'olease', lease)
      hold(app, ep, NOW + lease_ms, true)
    end
    return n
  end
  if st[1] == 'half' or st[1] == 'open' then
    -- One probe at a time; nothing else until it is answered.
    local expires = st[2] and redis.call('ZSCORE', LEASES, st[2])
    if expires then
      hold(app, ep, tonumber(expires), true)
      return 0
    end
    local n, id = take_from(app, ep, 1)
    if n > 0 then
      redis.call('HSET', k, 'probe', id, 'state', 'half')
      hold(app, ep, NOW + lease_ms, true)
    end
    return ordered_take(n, id)
  end
  local interval, tolerance = c[2], c[3]
  if interval <= 0 then return ordered_take(take_from(app, ep, want)) end
  -- GCRA (mirrors ratelimit::admit).
  local tat = tonumber(st[3]) or NOW
  if tat < NOW then tat = NOW end
  local len = redis.call('LLEN', list_key(app, ep))
  local allowed = 0
  if tat - NOW <= tolerance then
    allowed = math.min(want, len, math.floor((tolerance - (tat - NOW)) / interval) + 1)
  end
  local n, lease = take_from(app, ep, allowed)
  ordered_take(n, lease)
  tat = tat + n * interval
  redis.call('HSET', k, 'tat', tat)
  if n < want and len > n then
    hold(app, ep, math.ceil(tat - tolerance), true)
    redis.call('HINCRBY', k, 'rlw', 1)
    redis.call('HINCRBY', STATS, 'rate_limited', 1)
  end
  return n
end

-- One app's turn: its partitions in round-robin order, up to `budget` jobs.
local function turn(app, budget)
  local gave, intake = 0, false
  for _, part in ipairs(redis.call('ZRANGE', parts_key(app), 0, -1)) do
    if budget <= 0 then break end
    local n
    if part == '' then
      -- An app this worker has nothing of in flight: one endpoint's cap.
      local room = intake_room[app] or d_epcap
      local ik, lease = ep_key(app, ''), nil
      local ordered = redis.call('HEXISTS', CONF, 'o:' .. app) == 1
      if ordered then
        -- It has an ordered endpoint: one new event at a time, fleet-wide,
        -- so that they reach its partitions in the order they came.
        local held = redis.call('HGET', ik, 'ilease')
        if held and redis.call('ZSCORE', LEASES, held) then room = 0 else room = math.min(room, 1) end
      end
      n, lease = take_from(app, '', math.min(room, budget))
      if n > 0 then
        intake = true
        intake_room[app] = room - n
        if ordered then redis.call('HSET', ik, 'ilease', lease) end
      end
    else
      n = take_endpoint(app, part, budget)
      if n > 0 then
        local key = app .. '|' .. part
        ep_room[key] = ep_room[key] - n
      end
    end
    if n > 0 then
      gave, budget = gave + n, budget - n
      if redis.call('LLEN', list_key(app, part)) == 0 then
        redis.call('ZREM', parts_key(app), part)
        if part ~= '' then refresh_busy(app, part) end
      elseif redis.call('ZSCORE', parts_key(app), part) then
        redis.call('ZADD', parts_key(app), vnext(), part)
      end
    end
  end
  return gave, intake
end

-- Turns of quantum x weight jobs; when the batch is large against the apps
-- waiting, turns grow alike for all (weights kept), so one app alone takes
-- a whole batch in one turn.
local total_weight = 0
for _, app in ipairs(redis.call('ZRANGE', READY, 0, max)) do
  total_weight = total_weight + app_conf(app)
end
local scale = math.max(1, math.floor(max / math.max(1, quantum * total_weight)))
local remaining, stuck, nstuck, intake_apps = max, {}, 0, {}
while remaining > 0 do
  local progress = false
  for _, app in ipairs(redis.call('ZRANGE', READY, 0, remaining + nstuck)) do
    if remaining <= 0 then break end
    if not stuck[app] then
      local weight, room = app_conf(app)
      local gave, intake = 0, false
      if room > 0 then
        gave, intake = turn(app, math.min(quantum * weight * scale, room, remaining))
      end
      if gave > 0 then
        progress = true
        app_room[app] = room - gave
        remaining = remaining - gave
        if intake then intake_apps[app] = true end
        if redis.call('ZCARD', parts_key(app)) > 0 then
          redis.call('ZADD', READY, vnext(), app)
          redis.call('ZADD', WAITING, NOW, app)
        else
          redis.call('ZREM', READY, app)
          redis.call('ZREM', WAITING, app)
        end
      else
        stuck[app] = true
        nstuck = nstuck + 1
      end
    end
  end
  if not progress then break end
end

local more = 0
if remaining <= 0 and redis.call('ZCARD', READY) > nstuck then
  more = 1
  -- Wake idle workers, at most every 20 ms.
  if redis.call('SET', P .. 'rang', '1', 'PX', 20, 'NX') then ring() end
end
local next_due = -1
for _, key in ipairs({ DELAYED, HELD, LEASES }) do
  local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
  if first[2] then
    local t = math.max(0, tonumber(first[2]) - NOW)
    if next_due < 0 or t < next_due then next_due = t end
  end
end

local result = { more, next_due, groups }
for _, v in ipairs(out) do result[#result + 1] = v end
local apps = {}
for app in pairs(intake_apps) do apps[#apps + 1] = app end
result[#result + 1] = #apps
for _, app in ipairs(apps) do
  local eps = redis.call('SMEMBERS', busy_key(app))
  result[#result + 1] = app
  result[#result + 1] = #eps
  for _, e in ipairs(eps) do result[#result + 1] = e end
end
return result
