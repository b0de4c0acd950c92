-- Shared by every queue script; each script is this file followed by its own.
-- ARGV[1] is the key prefix with the hash tag ("wasmhook:{0}:"), ARGV[2] the
-- doorbell channel. Every key is built from the prefix, so a script touches
-- one Redis Cluster slot.
--
-- Layout (P = ARGV[1]):
--   P..'ready'         ZSET app -> turn (apps with an eligible partition; lowest goes next)
--   P..'waiting'       ZSET app -> unix ms since it waits for a turn (the apps in 'ready':
--                      since it joined, or since its last turn; for the metrics)
--   P..'parts:'..app   ZSET partition -> turn ('' = new events, else an endpoint id)
--   P..'list:'..app..'|'..part   LIST of job ids (a partition), FIFO
--   P..'jobs'          HASH job id -> job JSON (a job waiting, leased or delayed)
--   P..'busy:'..app    SET endpoints with waiting jobs, a hold or a breaker not closed
--   P..'ep:'..app..'|'..ep       HASH breaker (state cf since cool probe reason last sN fN),
--                                hold (unix ms), tat (rate limiter)
--   P..'held'          ZSET 'app|ep' -> unix ms the hold ends
--   P..'delayed'       ZSET 'job id|app|part' -> unix ms due
--   P..'leases'        ZSET lease ('seq|app|part': the jobs one take gave from one
--                      partition) -> unix ms it expires
--   P..'lease:'..seq   SET the job ids of a lease still out
--   P..'inflight'      jobs in leases
--   P..'count'         jobs waiting in partitions
--   P..'conf'          HASH '_' -> 'quantum weight appcap epcap', 'a:'..app -> 'weight cap',
--                      'e:'..app..'|'..ep -> 'cap interval tolerance ordered events wait
--                      bytes' (the last three: batching, events 0 if not batched),
--                      'o:'..app -> '1' (it has an ordered endpoint: new events one at a time)
--   ep hash 'olease'   the lease of an ordered endpoint's one job in flight;
--   P..'ep:'..app..'|' (the new events' partition) 'ilease': the same for the
--                      one new event in flight of an app with an ordered endpoint
--   P..'ok:'..app..'|'..ep  HASH an ordering-keyed endpoint's keys: 'b:'..key -> '1' (a job
--                      of the key is out), 'j:'..job id -> key (the job out of each key),
--                      'n' -> jobs waiting behind their keys
--   P..'kq:'..app..'|'..ep..'|'..key  LIST the key's later job ids, waiting for it
--   ep hash 'bdue'     a batched endpoint's waiting jobs go at this time even
--                      if they are fewer than a batch
--   P..'stats'         HASH outcome counters
--   P..'dlq'           STREAM dead letters
--   P..'seq', P..'vclock'  counters (job and lease ids, turns)
local P = ARGV[1]
local DOORBELL = ARGV[2]
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local NOW = now_ms()
local READY, HELD, DELAYED = P .. 'ready', P .. 'held', P .. 'delayed'
local LEASES, JOBS, COUNT = P .. 'leases', P .. 'jobs', P .. 'count'
local INFLIGHT, WAITING = P .. 'inflight', P .. 'waiting'
local CONF, STATS, DLQ = P .. 'conf', P .. 'stats', P .. 'dlq'

local function vnext() return redis.call('INCR', P .. 'vclock') end
local function list_key(app, part) return P .. 'list:' .. app .. '|' .. part end
local function ep_key(app, ep) return P .. 'ep:' .. app .. '|' .. ep end
local function parts_key(app) return P .. 'parts:' .. app end
local function busy_key(app) return P .. 'busy:' .. app end

local rang = false
local function ring()
  if not rang then
    redis.call('PUBLISH', DOORBELL, '1')
    rang = true
  end
end

-- 'a|b' -> 'a', 'b' (ids never contain '|')
local function split_bar(s)
  local i = string.find(s, '|', 1, true)
  return string.sub(s, 1, i - 1), string.sub(s, i + 1)
end

-- 'id|app|part' -> id, app, part
local function split_entry(v)
  local i = string.find(v, '|', 1, true)
  local app, part = split_bar(string.sub(v, i + 1))
  return string.sub(v, 1, i - 1), app, part
end

-- A lease 'seq|app|part' -> the key of its set of job ids, app, part
local function lease_parts(lease)
  local seq, app, part = split_entry(lease)
  return P .. 'lease:' .. seq, app, part
end

-- Stores job bodies under new ids; returns the ids, in order.
local function store(bodies)
  local last = redis.call('INCRBY', P .. 'seq', #bodies)
  local ids, fields = {}, {}
  for j, body in ipairs(bodies) do
    local id = tostring(last - #bodies + j)
    ids[j] = id
    fields[#fields + 1] = id
    fields[#fields + 1] = body
  end
  for i = 1, #fields, 1000 do
    redis.call('HSET', JOBS, unpack(fields, i, math.min(i + 999, #fields)))
  end
  return ids
end

-- (The new events' partition, '', is held only for an ordered app's routing
-- retry.)
local function hold_of(app, part)
  local h = tonumber(redis.call('HGET', ep_key(app, part), 'hold'))
  if h and h > NOW then return h end
  return nil
end

-- A partition with jobs becomes eligible (unless held), its app active.
local function activate(app, part)
  if hold_of(app, part) then return end
  if not redis.call('ZSCORE', parts_key(app), part) then
    redis.call('ZADD', parts_key(app), vnext(), part)
  end
  if not redis.call('ZSCORE', READY, app) then
    redis.call('ZADD', READY, vnext(), app)
    redis.call('ZADD', WAITING, NOW, app)
    ring()
  end
end

local function deactivate(app, part)
  redis.call('ZREM', parts_key(app), part)
  if redis.call('ZCARD', parts_key(app)) == 0 then
    redis.call('ZREM', READY, app)
    redis.call('ZREM', WAITING, app)
  end
end

local function refresh_busy(app, ep)
  if ep == '' then return end
  local busy = redis.call('LLEN', list_key(app, ep)) > 0
  if not busy then
    local f = redis.call('HMGET', ep_key(app, ep), 'hold', 'state')
    busy = (tonumber(f[1]) or 0) > NOW or f[2] ~= false
  end
  if busy then
    redis.call('SADD', busy_key(app), ep)
  else
    redis.call('SREM', busy_key(app), ep)
  end
end

-- redis.call with a long argument list, in chunks (Lua's unpack has a limit).
local function call_chunked(cmd, key, args, per)
  for i = 1, #args, per do
    redis.call(cmd, key, unpack(args, i, math.min(i + per - 1, #args)))
  end
end

-- Adds stored jobs (their ids, in order) to a partition: at the back, or at
-- the front (then the first of `jobs` ends up first).
local function push_many(app, part, jobs, front)
  if #jobs == 0 then return end
  if front then
    local rev = {}
    for i = #jobs, 1, -1 do rev[#rev + 1] = jobs[i] end
    call_chunked('LPUSH', list_key(app, part), rev, 1000)
  else
    call_chunked('RPUSH', list_key(app, part), jobs, 1000)
  end
  redis.call('INCRBY', COUNT, #jobs)
  if part ~= '' then redis.call('SADD', busy_key(app), part) end
  activate(app, part)
end

local function push(app, part, job, front)
  push_many(app, part, { job }, front)
end

-- Ordering keys (an ordered endpoint with `order_by`): one job of a key is
-- out (in the partition, leased or waiting for its retry) at a time; the
-- key's later jobs wait in their own list until it ends.
local function keys_key(app, ep) return P .. 'ok:' .. app .. '|' .. ep end
local function key_list(app, ep, key) return P .. 'kq:' .. app .. '|' .. ep .. '|' .. key end

local function push_keyed(app, ep, key, id)
  local h = keys_key(app, ep)
  if redis.call('HSETNX', h, 'b:' .. key, '1') == 1 then
    redis.call('HSET', h, 'j:' .. id, key)
    push(app, ep, id, false)
  else
    redis.call('RPUSH', key_list(app, ep, key), id)
    redis.call('HINCRBY', h, 'n', 1)
    redis.call('INCRBY', COUNT, 1)
  end
end

-- The key's job out has ended: its next job (if any) goes.
local function release_key(app, ep, key)
  local h = keys_key(app, ep)
  local nxt = redis.call('LPOP', key_list(app, ep, key))
  if nxt then
    redis.call('HINCRBY', h, 'n', -1)
    redis.call('DECRBY', COUNT, 1)
    redis.call('HSET', h, 'j:' .. nxt, key)
    push(app, ep, nxt, false)
  else
    redis.call('HDEL', h, 'b:' .. key)
  end
end

-- Holds an endpoint's partition until `untl`; `exact` replaces a later hold.
local function hold(app, ep, untl, exact)
  local k = ep_key(app, ep)
  local cur = tonumber(redis.call('HGET', k, 'hold')) or 0
  if not exact and cur > untl then untl = cur end
  redis.call('HSET', k, 'hold', untl)
  redis.call('ZADD', HELD, untl, app .. '|' .. ep)
  deactivate(app, ep)
  if ep ~= '' then redis.call('SADD', busy_key(app), ep) end
end

local function unhold(app, ep)
  redis.call('HDEL', ep_key(app, ep), 'hold')
  redis.call('ZREM', HELD, app .. '|' .. ep)
  if redis.call('LLEN', list_key(app, ep)) > 0 then activate(app, ep) end
  refresh_busy(app, ep)
end

-- A lease that ends (committed) frees what it held in order: the next job of
-- an ordered endpoint, or the next new event of its app. The commit says so
-- to the worker that made it, which takes again (no fleet-wide doorbell per
-- ordered event).
local freed = false
local function release_order(lease)
  local _, app, part = lease_parts(lease)
  local k = ep_key(app, part)
  if part == '' then
    if redis.call('HGET', k, 'ilease') == lease then
      redis.call('HDEL', k, 'ilease')
      freed = true
    end
  elseif redis.call('HGET', k, 'olease') == lease then
    redis.call('HDEL', k, 'olease')
    unhold(app, part)
    freed = true
  end
end

-- Ends an endpoint's breaker, hold and rate state: as new.
local function reset(app, ep)
  redis.call('DEL', ep_key(app, ep))
  unhold(app, ep)
end

-- The breaker's sliding window: ten buckets of window/10 ms.
local function bucket_now(window)
  local size = math.max(1, math.floor(window / 10))
  return math.floor(NOW / size)
end

local function window_counts(k, window)
  local cur = bucket_now(window)
  local fields = {}
  for j = cur - 9, cur do
    fields[#fields + 1] = 's' .. j
    fields[#fields + 1] = 'f' .. j
  end
  local vals = redis.call('HMGET', k, unpack(fields))
  local n, failed = 0, 0
  for j = 1, #vals, 2 do
    local s, f = tonumber(vals[j]) or 0, tonumber(vals[j + 1]) or 0
    n = n + s + f
    failed = failed + f
  end
  return n, failed
end

local function count_answer(k, window, failed, n)
  local cur = bucket_now(window)
  local last = tonumber(redis.call('HGET', k, 'last'))
  if last and last < cur then
    for j = last - 9, math.min(last, cur - 10) do
      redis.call('HDEL', k, 's' .. j, 'f' .. j)
    end
  end
  if not last or last < cur then redis.call('HSET', k, 'last', cur) end
  redis.call('HINCRBY', k, (failed and 'f' or 's') .. cur, n or 1)
end
