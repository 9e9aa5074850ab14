"""The Lua scripts of batches (``shared/batches.py`` runs them; the module text there
says who writes what and when a batch's keys expire). Each one runs atomically in Redis,
so the gateway's cancel, the feeder's advance and the workers' counting never see each
other half done.
"""

from __future__ import annotations

# Every script: KEYS batch, items, results, batches; ARGV id, now, batch_ttl_s, ...
# settle(): once every item is counted, the batch is finished: completed (unless
# cancelled), finished_at, its keys expire, the feeder forgets it.
SETTLE_FN = """
local function settle()
  local c = redis.call('HMGET', KEYS[1], 'state', 'total', 'succeeded', 'failed', 'cancelled')
  if not c[1] then
    redis.call('ZREM', KEYS[4], ARGV[1])
    return 'gone'
  end
  local counted = tonumber(c[3] or '0') + tonumber(c[4] or '0') + tonumber(c[5] or '0')
  if counted < tonumber(c[2]) then return c[1] end
  if c[1] == 'running' then redis.call('HSET', KEYS[1], 'state', 'completed') end
  redis.call('HSETNX', KEYS[1], 'finished_at', ARGV[2])
  redis.call('DEL', KEYS[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[3])
  redis.call('ZREM', KEYS[4], ARGV[1])
  return 'finished'
end
"""
SETTLE = SETTLE_FN + "return settle()"

# Items not fed yet end cancelled (counted, not written); running ones finish.
CANCEL = (
    SETTLE_FN
    + """
local b = redis.call('HMGET', KEYS[1], 'state', 'total', 'fed')
if not b[1] then return 'gone' end
if b[1] == 'running' then
  redis.call('HSET', KEYS[1], 'state', 'cancelled', 'fed', b[2], 'fed_at_cancel', b[3],
    'cancelled_at', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'cancelled', tonumber(b[2]) - tonumber(b[3]))
  redis.call('DEL', KEYS[2])
end
return settle()
"""
)

# ARGV 4 start, 5 count, 6 created_at. Items [start, start+count) were published: fed
# moves on, unless it is not at start any more (another feeder got there: moving it again
# would skip items). After a cancel that counted these items as cancelled, their workers
# will count each once more (every published item is counted exactly once by a worker),
# so the cancel's count gives them back and the batch is looked at again.
ADVANCE = (
    SETTLE_FN
    + """
local b = redis.call('HMGET', KEYS[1], 'state', 'fed', 'total', 'fed_at_cancel')
if not b[1] then return 0 end
local start, stop = tonumber(ARGV[4]), tonumber(ARGV[4]) + tonumber(ARGV[5])
if b[1] == 'running' then
  if tonumber(b[2]) ~= start then return 0 end
  if redis.call('HINCRBY', KEYS[1], 'fed', ARGV[5]) >= tonumber(b[3]) then
    redis.call('DEL', KEYS[2])
  end
  return 1
end
if b[1] == 'cancelled' and b[4] and stop > tonumber(b[4]) then
  local given_back = stop - math.max(tonumber(b[4]), start)
  redis.call('HINCRBY', KEYS[1], 'cancelled', -given_back)
  redis.call('HSET', KEYS[1], 'fed_at_cancel', stop)
  redis.call('HDEL', KEYS[1], 'finished_at')
  redis.call('PERSIST', KEYS[1])
  redis.call('PERSIST', KEYS[3])
  redis.call('ZADD', KEYS[4], ARGV[6], ARGV[1])
  settle()
end
return 0
"""
)

# ARGV 4 start, 5 stop, 6 error JSON. The function (or qualifier) is gone: items
# [start, stop) fail without running, each with its line; fed moves past them.
FAIL = (
    SETTLE_FN
    + """
local b = redis.call('HMGET', KEYS[1], 'state', 'fed', 'total')
if b[1] ~= 'running' or tonumber(b[2]) ~= tonumber(ARGV[4]) then return -1 end
local failed = 0
for i = tonumber(ARGV[4]), tonumber(ARGV[5]) - 1 do
  local n = tostring(i)
  local line = '{"index":' .. n .. ',"request_id":"' .. ARGV[1] .. '-' .. n ..
    '","status":"failed","error":' .. ARGV[6] .. '}'
  failed = failed + redis.call('HSETNX', KEYS[3], n, line)
end
redis.call('HINCRBY', KEYS[1], 'failed', failed)
if redis.call('HINCRBY', KEYS[1], 'fed', tonumber(ARGV[5]) - tonumber(ARGV[4]))
   >= tonumber(b[3]) then
  redis.call('DEL', KEYS[2])
end
settle()
return failed
"""
)
