"""The Lua scripts ``StateStore`` runs in Redis (each one round trip, atomic); ``state.py`` says
what each key holds. Pure text."""

# KEYS: the lease, its epoch; ARGV: holder, ttl in ms. Returns the epoch while held, else 0. A
# renewal keeps the epoch; a takeover (also by the same holder after its lease lapsed) raises it
# to at least Redis's clock in milliseconds, so it keeps growing even if the epoch key is lost (a
# Redis restart takes longer than the millisecond: within one, a lost key could repeat an epoch).
_LEASE_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder ~= false and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local epoch = redis.call('GET', KEYS[2])
if holder ~= false and epoch ~= false then
  return tonumber(epoch)
end
local now = redis.call('TIME')
local next = math.max((tonumber(epoch) or 0) + 1, tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000))
redis.call('SET', KEYS[2], next)
return next
"""

# KEYS: a hash and a second one written with it; optionally a hash of removals by field (a
# restore's put). ARGV: field, value, the second hash's field and value, replace (0/1), and with
# the removals the value's ``created``. Returns 0, writing nothing, when the field is taken and not
# ``replace`` (an adapter name registered twice, or a key a restore would put back over a
# revocation written since); for a restore's, when the field holds a registration as new or newer,
# or a removal of that registration or a later one is recorded (a put racing a removal, or a
# removal and a registration again, made since the restore read Redis).
_PUT_BOTH_LUA = """
if KEYS[3] then
  local held = redis.call('HGET', KEYS[1], ARGV[1])
  local removal = redis.call('HGET', KEYS[3], ARGV[1])
  for _, found in ipairs({held or false, removal or false}) do
    if found and cjson.decode(found).created >= tonumber(ARGV[6]) then
      return 0
    end
  end
end
if ARGV[5] == '1' then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
elseif redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
return 1
"""

# KEYS: the registry hash, the versions hash. ARGV: name, entry, its version's field, replace (0/1).
# An adapter's registration, as _PUT_BOTH_LUA, returning {1, the entry it replaced or ''}, or {0, ''}
# when the name is taken and not ``replace``: of two replacements racing, each learns which one it
# replaced, so every version replaced is retired (one read before the write missed the other's).
_SWAP_ADAPTER_LUA = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old and ARGV[4] ~= '1' then
  return {0, ''}
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[3], ARGV[2])
return {1, old or ''}
"""

# KEYS: the registry hash [, the retired versions' set]. ARGV: name, created (a float's repr),
# version [, retired at (Unix seconds), the retired member]. Deletes the name's registration only
# while it is that one (a restore dropping a registration removed since its snapshot must not drop
# one registered again meanwhile), and then retires the version given. Returns 1 if deleted.
_DELETE_IF_LUA = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  return 0
end
local entry = cjson.decode(current)
local version = entry.version
if type(version) ~= 'string' then
  version = ''
end
if entry.created == tonumber(ARGV[2]) and version == ARGV[3] then
  if KEYS[2] then
    redis.call('ZADD', KEYS[2], ARGV[4], ARGV[5])
  end
  return redis.call('HDEL', KEYS[1], ARGV[1])
end
return 0
"""

# Delete a worker's heartbeat unless another start of it wrote it (a process that gave the id up,
# or a dispatcher forgetting a lost start, must not remove its successor's). KEYS: the heartbeat.
# ARGV: the incarnation. Returns 1 if the key is gone (deleted, or it was not there).
_FORGET_BEAT_LUA = """
local value = redis.call('GET', KEYS[1])
if value then
  local ok, beat = pcall(cjson.decode, value)
  if ok and type(beat) == 'table' and beat.incarnation ~= ARGV[1] then
    return 0
  end
  redis.call('DEL', KEYS[1])
end
return 1
"""

# Forget a retired adapter version unless it is the registered one again (a re-registration of
# the same files between the caller's look and this). KEYS: the registry hash, the versions hash,
# the retired set. ARGV: name, version. Returns 1 if forgotten.
_FORGET_VERSION_LUA = """
local key = ARGV[1] .. '@' .. ARGV[2]
redis.call('ZREM', KEYS[3], key)
local current = redis.call('HGET', KEYS[1], ARGV[1])
if current and cjson.decode(current).version == ARGV[2] then
  return 0
end
redis.call('HDEL', KEYS[2], key)
return 1
"""

# An in-flight record's fields: worker, request (the first GenerateRequest, JSON), next (the
# sequence number the next chunk carries) and tokens delivered, recoveries (the attempt now running:
# the fencing token), at (Redis clock, ms, when it last changed hands). A record expires unless its
# worker refreshes it (sweep, progress).

# KEYS: the in-flight hash. ARGV: worker, request JSON, index key prefix, request id, recoveries,
# ttl ms, the request's next_seq, the worker's incarnation, 1 if the worker running it before died
# (counted in deaths), 1 if the worker marks what it takes up (recorded as ``marks``, naming it: a
# put by an older version leaves the field, which then names another worker unless that put named
# the same one again), then optionally the
# worker and recoveries the record must still have (compare-and-set for a re-dispatch; 0 returned
# and nothing written if another got there first), or two empty strings: the record must not exist
# yet (a first dispatch; 0 if another request has the id). A resume or move changes only the
# worker, attempt and time: the first request and the progress since it stay, so a second resume
# counts right.
_PUT_INFLIGHT_LUA = """
local old = redis.call('HGET', KEYS[1], 'worker')
if ARGV[11] == '' then
  if old then  -- another request's, unless this is our write run again after its reply was lost
    return (old == ARGV[1] and redis.call('HGET', KEYS[1], 'request') == ARGV[2]) and 1 or 0
  end
elseif ARGV[11] and (old ~= ARGV[11] or redis.call('HGET', KEYS[1], 'recoveries') ~= ARGV[12]) then
  return 0
end
if old and old ~= ARGV[1] then
  redis.call('SREM', ARGV[3] .. old, ARGV[4])
end
local now = redis.call('TIME')
redis.call('HSET', KEYS[1], 'worker', ARGV[1], 'recoveries', ARGV[5], 'at', now[1] * 1000 + math.floor(now[2] / 1000),
  'incarnation', ARGV[8])
redis.call('HDEL', KEYS[1], 'taken')  -- a new holder (a move keeps the attempt) has not taken it up yet
if ARGV[10] == '1' then
  redis.call('HSET', KEYS[1], 'marks', ARGV[1])
else
  redis.call('HDEL', KEYS[1], 'marks')
end
redis.call('HINCRBY', KEYS[1], 'deaths', ARGV[9])
redis.call('HSETNX', KEYS[1], 'request', ARGV[2])
redis.call('HSETNX', KEYS[1], 'next', ARGV[7])
redis.call('HSETNX', KEYS[1], 'tokens', '')
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('SADD', ARGV[3] .. ARGV[1], ARGV[4])
return 1
"""

# A record is the caller's while it names the caller and the caller's attempt; a copy for which it
# does not (the request was given up on this worker and re-dispatched) is fenced: its writes are
# refused and the ids returned, so the worker drops those copies. A missing record is the caller's
# unless its copy was recorded before it was sent (GenerateRequest.recorded): then it ended or was
# given up, and a copy sent straight to a worker never had one.
_MINE_LUA = """
local function mine(key, worker, recoveries, recorded)
  local rec = redis.call('HMGET', key, 'worker', 'recoveries')
  if rec[1] == false then
    return recorded ~= '1'
  end
  return rec[1] == worker and rec[2] == recoveries
end
"""

# KEYS: in-flight hashes. ARGV: worker, index key prefix, ttl ms, then per key its request id, its
# attempt (recoveries), the chunk's sequence number, the step's token ids as "1,2,3," or "-" when it
# finished (the record goes), how many of the tokens so far have had their text held back, the
# text they made that was held back unsent (while it could begin a stop string), stamped with the
# next it goes with (a record an earlier worker's script appended to since keeps a stale one), the
# last chunk's sequence number it stands for (chunks kept through an outage are joined), and each
# joined chunk's token count ("2,1,3"). A chunk below the record's next is not appended again: a
# write retried after its reply was lost, or one Redis ran after its caller had given up on it. A
# missing record is left alone and its copy not fenced: it was sent straight to the worker, or Redis
# lost its data (a running request goes on; only a worker that stalled asks more strictly, with
# _FENCED_LUA).
_PROGRESS_LUA = (
    _MINE_LUA
    + """
local fenced = {}
for i, key in ipairs(KEYS) do
  local id, seq, tokens, last = ARGV[8 * i - 4], tonumber(ARGV[8 * i - 2]), ARGV[8 * i - 1], tonumber(ARGV[8 * i + 2])
  if not mine(key, ARGV[1], ARGV[8 * i - 3], '0') then
    table.insert(fenced, id)
  elseif tokens == "-" then
    redis.call('SREM', ARGV[2] .. ARGV[1], id)
    redis.call('DEL', key)
  elseif redis.call('EXISTS', key) == 1 then
    local next = tonumber(redis.call('HGET', key, 'next') or 0)
    if last >= next then
      -- joined chunks some of which a write Redis ran late appended already: their tokens are skipped
      local from, chunk = 1, seq
      for count in string.gmatch(ARGV[8 * i + 3], '[^,]+') do
        if chunk >= next then break end
        for _ = 1, tonumber(count) do from = string.find(tokens, ',', from, true) + 1 end
        chunk = chunk + 1
      end
      local old = redis.call('HGET', key, 'tokens') or ''
      redis.call('HSET', key, 'tokens', old .. string.sub(tokens, from), 'held', ARGV[8 * i], 'held_text',
        ARGV[8 * i + 1], 'held_next', last + 1, 'next', last + 1)
    end
    redis.call('HSET', key, 'taken', ARGV[8 * i - 3])  -- it runs there (had its admission's mark failed)
    redis.call('PEXPIRE', key, ARGV[3])
  end
end
return fenced
"""
)

# KEYS: in-flight hashes. ARGV: worker, then per key the attempt it took up. Marks each record that
# exists and names that worker and attempt as taken up by it ('taken' = the attempt): only then does
# that worker's loss count as a death of the request. Others are left alone.
_TAKEN_LUA = (
    _MINE_LUA
    + """
for i, key in ipairs(KEYS) do
  if redis.call('EXISTS', key) == 1 and mine(key, ARGV[1], ARGV[i + 1], '0') then
    redis.call('HSET', key, 'taken', ARGV[i + 1])
  end
end
return 0
"""
)

# KEYS: an in-flight hash. ARGV: worker, attempt, the workers that handed the request back (JSON).
# Writes them only while the record names that worker and attempt (the hand-back is of that copy;
# a record re-dispatched meanwhile is another dispatcher's). Returns 1 if written.
_HANDED_BACK_LUA = (
    _MINE_LUA
    + """
if redis.call('EXISTS', KEYS[1]) == 1 and mine(KEYS[1], ARGV[1], ARGV[2], '0') then
  redis.call('HSET', KEYS[1], 'handed', ARGV[3])
  return 1
end
return 0
"""
)

# KEYS: in-flight hashes. ARGV: worker, then per key its attempt and "1" if it was recorded before
# it was sent. Returns the indexes of the keys whose copies are fenced.
_FENCED_LUA = (
    _MINE_LUA
    + """
local fenced = {}
for i, key in ipairs(KEYS) do
  if not mine(key, ARGV[1], ARGV[2 * i], ARGV[2 * i + 1]) then
    table.insert(fenced, i)
  end
end
return fenced
"""
)

# KEYS: an in-flight hash. ARGV: index key prefix, request id, then optionally the worker and
# attempt it must still name, then optionally the request (as put_inflight stored it) it must still
# hold, not taken up by a worker that marks what it takes. Deletes it and its index entry; 0 if it
# names another (gone is fine: this very delete, run again after its reply was lost, must still say
# it did it).
_DELETE_INFLIGHT_LUA = """
local rec = redis.call('HMGET', KEYS[1], 'worker', 'recoveries', 'request', 'taken', 'marks')
if ARGV[3] and rec[1] and (rec[1] ~= ARGV[3] or rec[2] ~= ARGV[4]) then
  return 0
end
if ARGV[5] and rec[1] and (rec[3] ~= ARGV[5] or rec[4] == rec[2] or rec[5] ~= rec[1]) then
  return 0
end
if rec[1] then
  redis.call('SREM', ARGV[1] .. rec[1], ARGV[2])
end
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: the worker's index set. ARGV: worker, record key prefix, ttl ms, grace ms, the worker's
# incarnation, then the ids the worker holds. Refreshes the held records' expiry, drops index
# entries whose record expired or moved on, and returns {id, recoveries, 1 if the record names this
# incarnation, ...} of records naming this worker that it does not hold and that changed hands the
# grace ago or more (their message may still be on its way before; a grace of 0: every one, one
# written in the sweep's own millisecond too).
_SWEEP_LUA = """
local held = {}
for i = 6, #ARGV do
  held[ARGV[i]] = true
end
local now = redis.call('TIME')
local now_ms = now[1] * 1000 + math.floor(now[2] / 1000)
local lost = {}
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = ARGV[2] .. id
  local rec = redis.call('HMGET', key, 'worker', 'recoveries', 'at', 'incarnation')
  if rec[1] ~= ARGV[1] then
    redis.call('SREM', KEYS[1], id)
  elseif held[id] then
    redis.call('PEXPIRE', key, ARGV[3])
  elseif now_ms - tonumber(rec[3] or 0) >= tonumber(ARGV[4]) then
    table.insert(lost, id)
    table.insert(lost, rec[2] or '0')
    table.insert(lost, rec[4] == ARGV[5] and 1 or 0)
  end
end
return lost
"""
