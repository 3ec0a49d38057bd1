"""The Lua scripts behind every Redis write the interface promises to be atomic.

Why Lua and not MULTI/EXEC: most writes read before they write (does the user
exist, who holds the lease, is this session already revoked), and a script runs
whole on the server with nothing interleaved, in one round trip. Values arrive
as strings (ARGV) and are stored as given, so a float written by Python reads
back exactly.

A feed (revocations, user events) is an INCR counter and sorted sets scored by
the counter's ids: the counter never expires, so a cursor never goes back; the
sets carry a TTL pushed out to their newest entry's expiry (plus a margin), so
nothing lives forever if no purge runs. Some scripts name keys they compute
(the unionid index of a user's old unionid): fine on one Redis or Sentinel; on
Redis Cluster every key would need one hash tag (docs/deployment.md).
"""

from __future__ import annotations

# Shared helpers, prepended to the scripts that need them.
_EXTEND = """
local function extend(key, ttl)
  local left = redis.call('TTL', key)
  if left < 0 or left < ttl then redis.call('EXPIRE', key, ttl) end
end
"""

# append_event(...) appends one event to the feed named by KEYS_EV (seq, feed,
# until) and wakes the workers listening on `channel`; returns its id.
_APPEND_EVENT = (
    _EXTEND
    + """
local function append_event(kind, appid, openid, epoch, keep, ttl, channel)
  local id = redis.call('INCR', KEYS_EV[1])
  local member = cjson.encode({id, kind, appid, openid, epoch})
  redis.call('ZADD', KEYS_EV[2], id, member)
  redis.call('ZADD', KEYS_EV[3], keep, member)
  extend(KEYS_EV[2], ttl)
  extend(KEYS_EV[3], ttl)
  redis.call('PUBLISH', channel, 'ev')
  return id
end
"""
)

# The event keys of a script whose KEYS are: user, users, ev seq, ev feed, ev until.
_EVENT_KEYS = "local KEYS_EV = {KEYS[3], KEYS[4], KEYS[5]}\n"

# KEYS: user, users. ARGV: member, unionid ('' = none), session_key, now, unionid key prefix.
UPSERT_LOGIN = """
local key, member, unionid = KEYS[1], ARGV[1], ARGV[2]
redis.call('HSETNX', key, 'created_at', ARGV[4])
redis.call('HSETNX', key, 'epoch', 0)
redis.call('HSET', key, 'session_key', ARGV[3], 'last_login_at', ARGV[4])
if unionid ~= '' then
  local old = redis.call('HGET', key, 'unionid')
  if old and old ~= unionid then redis.call('SREM', ARGV[5] .. old, member) end
  redis.call('HSET', key, 'unionid', unionid)
  redis.call('SADD', ARGV[5] .. unionid, member)
end
redis.call('SADD', KEYS[2], member)
return redis.call('HGETALL', key)
"""

# KEYS: user, users, ev seq, ev feed, ev until.
# ARGV: member, phone, now, appid, openid, until, ttl, channel.
SET_PHONE = (
    _EVENT_KEYS
    + _APPEND_EVENT
    + """
local key = KEYS[1]
redis.call('HSETNX', key, 'created_at', ARGV[3])
redis.call('HSETNX', key, 'last_login_at', ARGV[3])
redis.call('HSETNX', key, 'epoch', 0)
redis.call('HSET', key, 'phone_number', ARGV[2])
redis.call('SADD', KEYS[2], ARGV[1])
local epoch = tonumber(redis.call('HGET', key, 'epoch'))
append_event('phone', ARGV[4], ARGV[5], epoch, ARGV[6], tonumber(ARGV[7]), ARGV[8])
return epoch
"""
)

# KEYS: user, users, ev seq, ev feed, ev until. ARGV: appid, openid, until, ttl, channel.
# Nothing is written for an unknown user (no record, no event).
REVOKE_USER = (
    _EVENT_KEYS
    + _APPEND_EVENT
    + """
local key = KEYS[1]
if redis.call('EXISTS', key) == 0 then return false end
local epoch = redis.call('HINCRBY', key, 'epoch', 1)
append_event('revoke', ARGV[1], ARGV[2], epoch, ARGV[3], tonumber(ARGV[4]), ARGV[5])
return redis.call('HGETALL', key)
"""
)

# KEYS: ev seq, ev feed, ev until. ARGV: kind, appid, openid, epoch, until, ttl, channel.
# A migration's copy of an event as it is.
APPEND_EVENT = (
    "local KEYS_EV = {KEYS[1], KEYS[2], KEYS[3]}\n"
    + _APPEND_EVENT
    + "return append_event(ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5],"
    + " tonumber(ARGV[6]), ARGV[7])"
)

# KEYS: user, users. ARGV: member, unionid, session_key, phone, created_at,
# last_login_at, epoch, unionid key prefix. '' is None.
# A migration's copy of a record: every field from the source, but the epoch never
# goes down (a lower one would bring revoked tokens back).
IMPORT_USER = """
local key, member, unionid = KEYS[1], ARGV[1], ARGV[2]
local old = redis.call('HGET', key, 'unionid')
if old and old ~= unionid then redis.call('SREM', ARGV[8] .. old, member) end
local fields = {unionid = ARGV[2], session_key = ARGV[3], phone_number = ARGV[4]}
for name, value in pairs(fields) do
  if value == '' then redis.call('HDEL', key, name) else redis.call('HSET', key, name, value) end
end
local epoch = tonumber(redis.call('HGET', key, 'epoch') or '0')
if tonumber(ARGV[7]) > epoch then epoch = tonumber(ARGV[7]) end
redis.call('HSET', key, 'created_at', ARGV[5], 'last_login_at', ARGV[6], 'epoch', epoch)
if unionid ~= '' then redis.call('SADD', ARGV[8] .. unionid, member) end
redis.call('SADD', KEYS[2], member)
return epoch
"""

# KEYS: rev seq, rev ids, rev expiry. ARGV: session_id, expires_at, ttl, channel.
# Idempotent: a session already revoked keeps its id (no new id, no new entry,
# no wake-up). The PUBLISH is part of the script, so no revocation is ever
# stored without its wake-up being sent (a listener may still miss it: the
# catch-up read after each subscription covers that).
REVOKE_SESSION = (
    _EXTEND
    + """
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
local id = redis.call('INCR', KEYS[1])
redis.call('ZADD', KEYS[2], id, ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
extend(KEYS[2], tonumber(ARGV[3]))
extend(KEYS[3], tonumber(ARGV[3]))
redis.call('PUBLISH', ARGV[4], 'rev')
return id
"""
)

# KEYS: seq, feed. ARGV: cursor. Returns {seq, member, id, member, id, ...}.
# Read together with the counter, so a cursor ahead of it (the store was reset:
# a Redis without persistence restarted, a failover to a replica behind) is seen
# and answered with everything still stored instead of nothing, forever.
SINCE = """
local seq = tonumber(redis.call('GET', KEYS[1]) or '0')
local cursor = tonumber(ARGV[1])
if cursor > seq then cursor = 0 end
local found = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. cursor, '+inf', 'WITHSCORES')
table.insert(found, 1, seq)
return found
"""

# KEYS: ids (scored by id), expiry (scored by the time the entry may go).
# ARGV: now, limit. Drops up to `limit` entries due strictly before now; returns
# how many went (the caller repeats while a batch comes back full).
PURGE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZREM', KEYS[2], member)
end
return #due
"""

# KEYS: token key. ARGV: token, expires_at, fence. Refused (0) when a write with a
# newer fence was seen: a holder that stalled past its lease cannot overwrite the
# token of the one that took the lease after it. The fence outlives a clear.
PUT_IF_NEWER_FENCE = """
local seen = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
if tonumber(ARGV[3]) < seen then return 0 end
redis.call('HSET', KEYS[1], 'token', ARGV[1], 'expires_at', ARGV[2], 'fence', ARGV[3])
return 1
"""

# KEYS: token key. ARGV: token. Clears the cached token only if it is still this one,
# keeping the newest fence seen (a stalled holder's late write is still refused).
FORGET_IF_SAME = """
if redis.call('HGET', KEYS[1], 'token') == ARGV[1] then
  redis.call('HDEL', KEYS[1], 'token', 'expires_at')
end
return 0
"""

# KEYS: lease, its fence counter. ARGV: holder, expires_at, now, ttl (seconds, the
# lease key's own TTL). Taken when free, expired (expires_at <= now) or already
# ours (a renewal). Returns the holding's fencing number, 0 when refused: a new
# holding INCRs the counter, which has no TTL (a number is never handed out
# twice, however long the lease lay free); a renewal keeps its number.
ACQUIRE_LEASE = """
local holder = redis.call('HGET', KEYS[1], 'holder')
local fence = false
if holder == ARGV[1] then
  fence = tonumber(redis.call('HGET', KEYS[1], 'fence') or '0')
elseif holder then
  if tonumber(redis.call('HGET', KEYS[1], 'expires_at')) > tonumber(ARGV[3]) then return 0 end
end
if not fence or fence == 0 then fence = redis.call('INCR', KEYS[2]) end
redis.call('HSET', KEYS[1], 'holder', ARGV[1], 'expires_at', ARGV[2], 'fence', fence)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return fence
"""

# KEYS: lease. ARGV: holder. Only the holder gives it back.
RELEASE_LEASE = """
if redis.call('HGET', KEYS[1], 'holder') == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""

# -- rate limits across instances (gateway.ratelimit_shared) -----------------
# Both read the clock of Redis (TIME), not of the caller: instances on machines
# whose clocks differ still share one time line.

# KEYS: bucket. ARGV: interval (seconds between requests at the rate), burst.
# GCRA, the token bucket as one stored number: the theoretical arrival time of
# the next request (TAT). Taken when TAT - (burst - 1) * interval <= now. Returns
# '0' when taken, else the seconds until one would be; strings, because Redis
# truncates a Lua number to an integer.
GCRA_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local interval, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local wait = tat - (burst - 1) * interval - now
if wait > 0 then return string.format('%.6f', wait) end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.6f', tat), 'PX', math.ceil((tat - now) * 1000) + 1000)
return '0'
"""

# KEYS: live members (a sorted set scored by last sync), then one counter per key.
# ARGV: member, live_for (seconds), ttl_ms (of the counters), then per counter
# three: delta, want, limit. Marks ``member`` live, forgets members silent for
# ``live_for``; per counter adds delta (spent beyond the claim, or given back),
# then grants up to ``want`` of what ``limit`` leaves and adds the grant: claims
# taken here never sum past the limit. Returns {live members, grant, grant, ...}.
CLAIM_SHARES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], 3600)
local out = {redis.call('ZCARD', KEYS[1])}
for i = 2, #KEYS do
  local at = 4 + (i - 2) * 3
  local total = redis.call('INCRBY', KEYS[i], ARGV[at])
  if total < 0 then  -- gave back more than a Redis that lost its counters holds
    total = 0
    redis.call('SET', KEYS[i], 0)
  end
  local grant = math.min(tonumber(ARGV[at + 1]), math.max(0, tonumber(ARGV[at + 2]) - total))
  if grant > 0 then redis.call('INCRBY', KEYS[i], grant) end
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
  out[i] = grant
end
return out
"""
