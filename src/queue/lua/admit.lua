-- Adds jobs to their partitions; dead-letters what cannot be queued; acks
-- inbox entries. ARGV: 3 inbox key ('' for none), 4 n jobs, then app, part,
-- job triples; then n dead letters (JSON); then n inbox ids.
local i = 4
local n = tonumber(ARGV[i]); i = i + 1
for _ = 1, n do
  push(ARGV[i], ARGV[i + 1], ARGV[i + 2], false)
  i = i + 3
end
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
