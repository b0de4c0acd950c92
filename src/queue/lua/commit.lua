-- Records outcomes and releases leases. A lease that expired (its job was
-- handed out again) records nothing but what the attempt said about the
-- endpoint. ARGV: 3 breaker 'rate min_requests window consecutive cool
-- max_cool disable_after' (ms), 4 disable reason, 5 max hold (ms),
-- 6 n completions, then their n leases ('lease#job id'), then per
-- completion: its counters (names joined by ','), n effects, effects:
--   'E' app part key job (key: '' none, else 'k' and the job's ordering
--   key: it waits behind the key's job out) | 'S' delay app part job |
--   'F' delay app part job (back to the front, the partition held for delay:
--   an ordered endpoint's retry, or an ordered app's routing retry) |
--   'D' letter |
--   'H' app endpoint signal arg   (signal: ok (arg: how many), fail,
--                                  slow (arg: ms), off (arg: reason))
-- then n, and (app, endpoint, successes) triples: successes not followed by
-- another signal of the same endpoint in this batch.
-- Returns '1' if it freed an ordered endpoint or an app's new events ('0'
-- if not), then breaker changes: app, endpoint, state triples.
local r, mr, win, consec, cool, max_cool, disable =
  string.match(ARGV[3], '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+)$')
r, mr, win, consec = tonumber(r), tonumber(mr), tonumber(win), tonumber(consec)
cool, max_cool, disable = tonumber(cool), tonumber(max_cool), tonumber(disable)
local disable_reason, max_hold = ARGV[4], tonumber(ARGV[5])
local changes = {}

local function health(app, ep, signal, arg, n)
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
    count_answer(k, win, false, n)
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

local n = tonumber(ARGV[6])
local L = 7

-- Which jobs are still leased, lease by lease: one whose lease lapsed was
-- handed out again, and records only health.
local live, leases, order = {}, {}, {}
for c = 1, n do
  local lease, job = string.match(ARGV[L + c - 1], '^(%d+|[^|#]*|[^|#]*)#(%d+)$')
  -- Anything else is no lease of ours: it records nothing but health.
  if lease then
    local g = leases[lease]
    if not g then
      g = { jobs = {}, at = {} }
      leases[lease] = g
      order[#order + 1] = lease
    end
    g.jobs[#g.jobs + 1] = job
    g.at[#g.at + 1] = c
  end
end
local done = {}
for _, lease in ipairs(order) do
  local g = leases[lease]
  local set = lease_parts(lease)
  local mine = {}
  for c = 1, #g.jobs, 500 do
    local flags = redis.call('SMISMEMBER', set, unpack(g.jobs, c, math.min(c + 499, #g.jobs)))
    for j, f in ipairs(flags) do
      if f == 1 then
        live[g.at[c + j - 1]] = true
        mine[#mine + 1] = g.jobs[c + j - 1]
      end
    end
  end
  if #mine > 0 then
    call_chunked('SREM', set, mine, 500)
    redis.call('DECRBY', INFLIGHT, #mine)
    if redis.call('EXISTS', set) == 0 then redis.call('ZREM', LEASES, lease) end
    for _, job in ipairs(mine) do done[#done + 1] = job end
  end
end
-- The jobs of held leases are done (a retry or a move stores its job anew).
call_chunked('HDEL', JOBS, done, 500)

local counts = {}
-- Jobs to put at the back of partitions (fan-out, parking): stored and
-- pushed together after every completion, a partition's in one push.
local queued = {}
local i = 7 + n
for c = 1, n do
  local lease, stats, k = string.match(ARGV[L + c - 1], '^(.*)#'), ARGV[i], tonumber(ARGV[i + 1])
  i = i + 2
  local ok = live[c]
  if ok and stats ~= '' then
    if string.find(stats, ',', 1, true) then
      for name in string.gmatch(stats, '[^,]+') do counts[name] = (counts[name] or 0) + 1 end
    else
      counts[stats] = (counts[stats] or 0) + 1
    end
  end
  -- Its end frees the next job of an ordered endpoint (before its effects,
  -- which may hold the endpoint again).
  if ok and lease then release_order(lease) end
  -- A job of an ordering key: the key stays taken if the job comes back (a
  -- retry), else the key's next job goes.
  local lkey, lapp, lpart, kept = nil, nil, nil, false
  -- (Leases of new events end in '|': no endpoint, no key.)
  if ok and lease and string.byte(lease, -1) ~= 124 then
    local _set
    _set, lapp, lpart = lease_parts(lease)
    if lpart ~= '' then
      local jid = string.match(ARGV[L + c - 1], '#(%d+)$')
      lkey = redis.call('HGET', keys_key(lapp, lpart), 'j:' .. jid)
      if lkey then redis.call('HDEL', keys_key(lapp, lpart), 'j:' .. jid) end
    end
  end
  local function keep_key(app, part, id)
    if lkey and app == lapp and part == lpart then
      redis.call('HSET', keys_key(app, part), 'j:' .. id, lkey)
      kept = true
    end
  end
  for _ = 1, k do
    local kind = ARGV[i]
    if kind == 'E' then
      if ok then queued[#queued + 1] = i end
      i = i + 5
    elseif kind == 'S' then
      if ok then
        local id = store({ ARGV[i + 4] })[1]
        redis.call('ZADD', DELAYED, NOW + tonumber(ARGV[i + 1]),
          id .. '|' .. ARGV[i + 2] .. '|' .. ARGV[i + 3])
        keep_key(ARGV[i + 2], ARGV[i + 3], id)
      end
      i = i + 5
    elseif kind == 'F' then
      if ok then
        local app, part = ARGV[i + 2], ARGV[i + 3]
        local id = store({ ARGV[i + 4] })[1]
        push(app, part, id, true)
        keep_key(app, part, id)
        -- (No delay: no hold, and any other hold stays as it is.)
        local delay = tonumber(ARGV[i + 1])
        if delay > 0 then hold(app, part, NOW + delay, true) end
      end
      i = i + 5
    elseif kind == 'D' then
      if ok then redis.call('XADD', DLQ, '*', 'dead', ARGV[i + 1]) end
      i = i + 2
    elseif kind == 'H' then
      local signal = ARGV[i + 3]
      health(ARGV[i + 1], ARGV[i + 2], signal, ARGV[i + 4], signal == 'ok' and tonumber(ARGV[i + 4]) or 1)
      i = i + 5
    else
      return redis.error_reply('unknown effect ' .. tostring(kind))
    end
  end
  if lkey and not kept then release_key(lapp, lpart, lkey) end
  -- A half-open probe came back without closing or reopening the breaker
  -- (a plugin dropped it, say): let the next probe go. Leases of new events
  -- end in '|' (no endpoint).
  if live[c] and string.byte(lease, -1) ~= 124 then
    local _, app, part = lease_parts(lease)
    local key = ep_key(app, part)
    if redis.call('HGET', key, 'probe') == lease then
      redis.call('HDEL', key, 'probe')
      if redis.call('HGET', key, 'state') == 'half' then unhold(app, part) end
    end
  end
end
if #queued > 0 then
  local bodies = {}
  for q, at in ipairs(queued) do bodies[q] = ARGV[at + 4] end
  local ids = store(bodies)
  local runs, order = {}, {}
  for q, at in ipairs(queued) do
    local app, part, key = ARGV[at + 1], ARGV[at + 2], ARGV[at + 3]
    if key ~= '' and part ~= '' then
      push_keyed(app, part, string.sub(key, 2), ids[q])
    else
      local p = app .. '|' .. part
      if not runs[p] then
        runs[p] = { app = app, part = part, ids = {} }
        order[#order + 1] = p
      end
      local r = runs[p].ids
      r[#r + 1] = ids[q]
    end
  end
  for _, p in ipairs(order) do push_many(runs[p].app, runs[p].part, runs[p].ids, false) end
end
for _ = 1, tonumber(ARGV[i]) do
  health(ARGV[i + 1], ARGV[i + 2], 'ok', '', tonumber(ARGV[i + 3]))
  i = i + 3
end
for name, count in pairs(counts) do redis.call('HINCRBY', STATS, name, count) end
table.insert(changes, 1, freed and '1' or '0')
return changes
