-- Closes an endpoint's breaker and ends its hold. ARGV: 3 app, 4 endpoint.
reset(ARGV[3], ARGV[4])
return 1
