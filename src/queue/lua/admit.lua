-- Adds jobs to their partitions; dead-letters what cannot be queued; acks
-- inbox entries. ARGV: 3 inbox key ('' for none), 4 n jobs, then app, part,
-- job triples; then n dead letters (JSON); then n inbox ids.
local i = 4
local n = tonumber(ARGV[i]); i = i + 1
-- Runs of jobs for the same partition go in one push.
local run_app, run_part, run = nil, nil, {}
for _ = 1, n do
  local app, part = ARGV[i], ARGV[i + 1]
  if app ~= run_app or part ~= run_part then
    if run_app then push_many(run_app, run_part, store(run), false) end
    run_app, run_part, run = app, part, {}
  end
  run[#run + 1] = ARGV[i + 2]
  i = i + 3
end
if run_app then push_many(run_app, run_part, store(run), false) end
n = tonumber(ARGV[i]); i = i + 1
if n > 0 then redis.call('HINCRBY', STATS, 'dead', n) end
for _ = 1, n do
  redis.call('XADD', DLQ, '*', 'dead', ARGV[i])
  i = i + 1
end
n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  redis.call('XACK', ARGV[3], 'workers', ARGV[i])
  redis.call('XDEL', ARGV[3], ARGV[i])
  i = i + 1
end
return 1
