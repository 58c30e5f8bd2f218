"""The write rule, server side: Lua scripts that write a row only if it is newer.

Feast's rule (``FORMAT.md``): a row is written when the stored ``_ts:{view}`` is absent or
strictly older than the new event time (equal timestamps are skipped, so replays are no-ops),
and ``EXPIRE key_ttl_seconds`` follows every write that happens when the option is set. The
scripts compare event times in Redis, so concurrent writers and replays never move a row back
in time. Which script a client runs is its transport's choice (``transport.py``).
"""

from __future__ import annotations

from typing import Final

# Lua: the stored Timestamp proto ``cur`` (non-empty) as seconds ``s`` and nanos ``n``.
_LUA_DECODE_TS: Final = """
local s, n, pos = 0, 0, 1
local len = #cur
while pos <= len do
  local tag = string.byte(cur, pos)
  pos = pos + 1
  local v, mul = 0, 1
  while true do
    local b = string.byte(cur, pos)
    pos = pos + 1
    v = v + (b % 128) * mul
    mul = mul * 128
    if b < 128 then break end
  end
  if tag == 8 then s = v elseif tag == 16 then n = v end
end
"""

# KEYS[1]: entity hash. ARGV: ts field, new seconds, new nanos, new ts proto, ttl seconds (0 =
# none), then feature field/value pairs. Writes only if the stored _ts is absent or strictly
# older, exactly Feast's rule (equal timestamps are skipped), so replays are no-ops.
WRITE_IF_NEWER: Final = (
    """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and #cur > 0 then
"""
    + _LUA_DECODE_TS
    + """  local ns, nn = tonumber(ARGV[2]), tonumber(ARGV[3])
  if ns < s or (ns == s and nn <= n) then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4], unpack(ARGV, 6))
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) end
return 1
"""
)


# The same rule for many entities in one call (one script run instead of one per entity:
# Redis spent most of a batch's write time dispatching the per-entity calls).
# KEYS: entity hashes. ARGV: ts field, ttl seconds (0 = none), number of features F, the F
# feature fields, then per key: new seconds, new nanos, new ts proto, the F values.
# Returns the number of rows written.
WRITE_MANY_IF_NEWER: Final = (
    """
local tsf, ttl, f = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local stride = 3 + f
local written = 0
local args = {tsf}
for j = 1, f do args[2 * j + 1] = ARGV[3 + j] end
for i = 1, #KEYS do
  local a = 4 + f + (i - 1) * stride
  local newer = true
  local cur = redis.call('HGET', KEYS[i], tsf)
  if cur and #cur > 0 then
"""
    + _LUA_DECODE_TS
    + """    local ns, nn = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
    if ns < s or (ns == s and nn <= n) then newer = false end
  end
  if newer then
    args[2] = ARGV[a + 2]
    for j = 1, f do args[2 * j + 2] = ARGV[a + 2 + j] end
    redis.call('HSET', KEYS[i], unpack(args))
    if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
    written = written + 1
  end
end
return written
"""
)
# Rows per batched script call: bounds how long one call holds the (single-threaded) server.
WRITE_CHUNK: Final = 1_000

# The batched write script with its keys taken from ARGV, for a Redis Cluster: ARGV[1] is the
# number of keys K, ARGV[2..K+1] the keys, then exactly the arguments of WRITE_MANY_IF_NEWER.
# Under the ``allow-cross-slot-keys`` flag (Redis >= 7.0) a script's undeclared keys need only
# be on the node that runs it, which the per-node split of ``transport.py`` guarantees.
CLUSTER_WRITE_MANY_IF_NEWER: Final = (
    "#!lua flags=allow-cross-slot-keys\n"
    "local nk = tonumber(ARGV[1])\n"
    "local KEYS, A = {}, {}\n"
    "for i = 1, nk do KEYS[i] = ARGV[1 + i] end\n"
    "for i = nk + 2, #ARGV do A[#A + 1] = ARGV[i] end\n"
    "local ARGV = A\n" + WRITE_MANY_IF_NEWER
)
