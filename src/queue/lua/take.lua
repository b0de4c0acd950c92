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
    -- cap, rate interval, rate tolerance, ordered, then batching: max
    -- events (0: not batched), max wait (ms), max bytes.
    c = { d_epcap, 0, 0, false, 0, 0, 0 }
    local s = redis.call('HGET', CONF, 'e:' .. key)
    if s then
      local w = {}
      for x in string.gmatch(s, '%S+') do w[#w + 1] = x end
      -- ordered: '1' the whole endpoint ('k': per key, kept by commit)
      c = { tonumber(w[1]), tonumber(w[2]), tonumber(w[3]), w[4] == '1',
        tonumber(w[5]) or 0, tonumber(w[6]) or 0, tonumber(w[7]) or 0 }
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
local function lease_ids(app, part, jobs, disabled)
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
  redis.call('INCRBY', INFLIGHT, m)
  return lease
end

local function take_from(app, part, n, disabled)
  if n <= 0 then return 0 end
  local jobs = redis.call('LPOP', list_key(app, part), n)
  if not jobs then return 0 end
  redis.call('DECRBY', COUNT, #jobs)
  return #jobs, lease_ids(app, part, jobs, disabled)
end

-- Batches: a batch is a job whose body starts with BATCH_HEAD and holds its
-- members' bodies (event.rs `Job::batch`).
local BATCH_HEAD = '{"batch":['
local function is_batch(body)
  return body and string.sub(body, 1, #BATCH_HEAD) == BATCH_HEAD
end

local function batch_body(app, ep, members)
  local id = 'batch_' .. string.sub(redis.sha1hex(P .. NOW .. ':' .. redis.call('INCR', P .. 'seq')), 1, 32)
  return BATCH_HEAD .. table.concat(members, ',') .. '],"id":"' .. id .. '","app_id":"' .. app
    .. '","event":{"name":"batch"},"created_ms":' .. NOW .. ',"endpoint":"' .. ep .. '"}'
end

-- Up to n batches from a batched endpoint's partition, under one lease. A
-- stored batch at the front (a retry, or one whose worker died) goes as it
-- is, with the same members; else the jobs at the front, up to max events
-- and max bytes (bodies as stored, each counted 64 bytes longer), become a
-- new batch and leave the queue as jobs of their own; fewer than max events
-- only when `flush`.
local function take_batches(app, ep, n, c, flush)
  if n <= 0 then return 0 end
  local L = list_key(app, ep)
  local units, popped = {}, 0
  while #units < n do
    local ids = redis.call('LRANGE', L, 0, c[5] - 1)
    if #ids == 0 then break end
    local bodies = redis.call('HMGET', JOBS, unpack(ids))
    local k = 1
    if not flush and #ids < c[5] and not is_batch(bodies[1]) then break end
    if is_batch(bodies[1]) then
      units[#units + 1] = ids[1]
    else
      local members, size = {}, 256
      for j = 1, #ids do
        local b = bodies[j]
        if is_batch(b) then break end
        if b then
          if #members > 0 and size + #b + 64 > c[7] then break end
          members[#members + 1] = b
          size = size + #b + 64
        end
        k = j
      end
      if #members > 0 then units[#units + 1] = store({ batch_body(app, ep, members) })[1] end
      local gone = {}
      for j = 1, k do gone[j] = ids[j] end
      call_chunked('HDEL', JOBS, gone, 1000)
    end
    redis.call('LTRIM', L, k, -1)
    popped = popped + k
  end
  redis.call('DECRBY', COUNT, popped)
  if redis.call('LLEN', L) == 0 then redis.call('HDEL', ep_key(app, ep), 'bdue') end
  if #units == 0 then return 0 end
  return #units, lease_ids(app, ep, units)
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
  -- What leaves the partition: batches on a batched endpoint, else jobs.
  -- Batched: full batches go at once; fewer events max wait after a take
  -- first found them waiting (the partition is held until then), or to a
  -- probe; a stored batch goes at once.
  local flush = true
  local function grab(n)
    if c[5] > 0 then return take_batches(app, ep, n, c, flush) end
    return take_from(app, ep, n)
  end
  if c[5] > 0 and st[1] ~= 'half' and st[1] ~= 'open' then
    local L = list_key(app, ep)
    local due = tonumber(redis.call('HGET', k, 'bdue'))
    flush = due ~= nil and due <= NOW
    if not flush and redis.call('LLEN', L) < c[5]
        and not is_batch(redis.call('HGET', JOBS, redis.call('LINDEX', L, 0) or '')) then
      if not due then
        due = NOW + c[6]
        redis.call('HSET', k, 'bdue', due)
      end
      hold(app, ep, due, false)
      return 0
    end
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
    local n, id = grab(1)
    if n > 0 then
      redis.call('HSET', k, 'probe', id, 'state', 'half')
      hold(app, ep, NOW + lease_ms, true)
    end
    return ordered_take(n, id)
  end
  local interval, tolerance = c[2], c[3]
  if interval <= 0 then return ordered_take(grab(want)) end
  -- GCRA (mirrors ratelimit::admit).
  local tat = tonumber(st[3]) or NOW
  if tat < NOW then tat = NOW end
  local len = redis.call('LLEN', list_key(app, ep))
  local allowed = 0
  if tat - NOW <= tolerance then
    allowed = math.min(want, len, math.floor((tolerance - (tat - NOW)) / interval) + 1)
  end
  local n, lease = grab(allowed)
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
