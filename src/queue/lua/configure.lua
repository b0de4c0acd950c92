-- Replaces the scheduling parameters. ARGV: 3 defaults, then field, value pairs.
redis.call('DEL', CONF)
redis.call('HSET', CONF, '_', ARGV[3])
for i = 4, #ARGV, 2 do
  redis.call('HSET', CONF, ARGV[i], ARGV[i + 1])
end
return 1
