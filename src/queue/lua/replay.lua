-- Puts a dead letter's job back in its partition and removes the letter; a
-- disabled endpoint is enabled again. ARGV: 3 dead letter id, 4 app, 5 part, 6 job.
if redis.call('XDEL', DLQ, ARGV[3]) == 0 then return 0 end
local app, part = ARGV[4], ARGV[5]
if part ~= '' and redis.call('HGET', ep_key(app, part), 'state') == 'disabled' then
  reset(app, part)
end
push(app, part, store({ ARGV[6] })[1], false)
return 1
