"""Redis side of the data plane: frames and features of each sample, their progress, and the
in-flight bound that gives back-pressure.

Per sample ``s`` of run ``r`` there are three kinds of keys (names in :class:`essp.contract.RedisKeys`):

* ``frames:s`` — the decoded frames (hash: ``data``, ``shape``, ``dtype``), deleted as soon as every
  extractor the sample needs has run;
* ``feat:<kind>:s`` — one feature per extractor kind (= stream), deleted when the consumer takes it;
* ``state:s`` — one field per stream, ``k:<stream>`` = 0 (to extract), 1 (extracted, waiting for its
  consumer) or 2 (consumed); it makes every step idempotent, so a redone job (at-least-once delivery)
  never double counts, and tells a consumer that finds no payload whether it is a duplicate notice or a
  lost payload (expired, or Redis restarted) that must be decoded again.

The run's ``inflight`` sorted set holds the samples between decode and consumption. A decode worker
adds its sample before it decodes and waits while the set is full (:meth:`SampleStore.acquire`); the
consumer removes it when the last of its streams is taken. Entries older than the payload TTL are
dropped, since their payloads have expired anyway. Every key has the TTL, so an abandoned run cleans
itself up. All state changes are Lua scripts: atomic, and one round trip each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis

from essp.clients.redis import redis_client
from essp.contract import RedisKeys
from essp.errors import ServiceUnavailable
from essp.settings import Settings

TO_EXTRACT, EXTRACTED, CONSUMED = 0, 1, 2

# KEYS: frames, state. ARGV: ttl, data, shape, dtype, stream...
# Marks new streams "to extract" (a redo keeps what already progressed) and stores the frames only
# if some stream still needs them. Returns how many streams still need extraction.
_PUT_FRAMES = """
local ttl = tonumber(ARGV[1])
local todo = 0
for i = 5, #ARGV do
  local field = 'k:' .. ARGV[i]
  local st = redis.call('HGET', KEYS[2], field)
  if not st then
    redis.call('HSET', KEYS[2], field, 0)
    st = '0'
  end
  if st == '0' then todo = todo + 1 end
end
redis.call('HSET', KEYS[2], 'streams', table.concat(ARGV, ',', 5))
redis.call('EXPIRE', KEYS[2], ttl)
if todo > 0 then
  redis.call('HSET', KEYS[1], 'data', ARGV[2], 'shape', ARGV[3], 'dtype', ARGV[4])
  redis.call('EXPIRE', KEYS[1], ttl)
end
return todo
"""

# KEYS: feature, state, frames. ARGV: ttl, stream, data, shape, dtype.
# Stores the feature and moves the stream to "extracted" unless it already moved on (a redo of a
# consumed sample stores nothing). Deletes the frames once no stream needs them. Returns the stream's
# state before the call (nil -> -1).
_PUT_FEATURE = """
local ttl = tonumber(ARGV[1])
local field = 'k:' .. ARGV[2]
local st = redis.call('HGET', KEYS[2], field)
if st == '2' then return 2 end
redis.call('HSET', KEYS[1], 'data', ARGV[3], 'shape', ARGV[4], 'dtype', ARGV[5])
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('HSET', KEYS[2], field, 1)
redis.call('EXPIRE', KEYS[2], ttl)
local streams = redis.call('HGET', KEYS[2], 'streams') or ''
local todo = 0
for s in string.gmatch(streams, '[^,]+') do
  if redis.call('HGET', KEYS[2], 'k:' .. s) == '0' then todo = todo + 1 end
end
if todo == 0 then redis.call('DEL', KEYS[3]) end
if not st then return -1 end
return tonumber(st)
"""

# KEYS: feature, state, inflight, frames. ARGV: stream, sample_id.
# Takes (reads and deletes) the feature, marks the stream consumed, and frees the in-flight slot when
# every stream of the sample is consumed. Returns {status, data, shape, dtype}: status 1 = taken,
# 2 = already consumed (duplicate notice), 0 = lost (no payload and not consumed).
_TAKE = """
local field = 'k:' .. ARGV[1]
local vals = redis.call('HMGET', KEYS[1], 'data', 'shape', 'dtype')
if not vals[1] then
  if redis.call('HGET', KEYS[2], field) == '2' then return {2} end
  return {0}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[2], field, 2)
local streams = redis.call('HGET', KEYS[2], 'streams') or ''
local live = 0
for s in string.gmatch(streams, '[^,]+') do
  if redis.call('HGET', KEYS[2], 'k:' .. s) ~= '2' then live = live + 1 end
end
if live == 0 then
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('DEL', KEYS[4])
end
return {1, vals[1], vals[2], vals[3]}
"""

# KEYS: inflight. ARGV: sample_id, limit, ttl. Returns 1 when the sample holds a slot (a redo keeps
# its slot), 0 when the run is at its bound.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now, ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"""

# KEYS: state, inflight, frames, feature... ARGV: sample_id, stream or '' (every stream), ttl.
# A sample that will never reach its consumer (decode or extraction failed): mark the stream(s)
# consumed, drop their payloads, and free the slot when nothing of the sample is left to consume.
_ABANDON = """
local streams = redis.call('HGET', KEYS[1], 'streams')
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'k:' .. ARGV[2], 2)
elseif streams then
  for s in string.gmatch(streams, '[^,]+') do redis.call('HSET', KEYS[1], 'k:' .. s, 2) end
end
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
local live, todo = 0, 0
if streams then
  for s in string.gmatch(streams, '[^,]+') do
    local st = redis.call('HGET', KEYS[1], 'k:' .. s)
    if st ~= '2' then live = live + 1 end
    if st == '0' then todo = todo + 1 end
  end
end
if todo == 0 then redis.call('DEL', KEYS[3]) end
if live == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
return live
"""


@dataclass(frozen=True)
class Taken:
    """What :meth:`SampleStore.take` found: the array, or why there is none."""

    status: str  # "taken" | "duplicate" | "lost"
    array: np.ndarray | None = None


def _encode_array(array: np.ndarray) -> tuple[bytes, str, str]:
    array = np.ascontiguousarray(array)
    return array.tobytes(), ",".join(str(d) for d in array.shape), array.dtype.str


def _decode_array(data: bytes, shape: bytes | str, dtype: bytes | str) -> np.ndarray:
    shape_s = shape.decode() if isinstance(shape, bytes) else shape
    dtype_s = dtype.decode() if isinstance(dtype, bytes) else dtype
    dims = tuple(int(d) for d in shape_s.split(",") if d)
    return np.frombuffer(data, dtype=np.dtype(dtype_s)).reshape(dims)


class SampleStore:
    """Frames, features, sample progress and the in-flight bound of one run, in Redis."""

    def __init__(self, settings: Settings, run: str, *, ttl_s: int | None = None) -> None:
        self.settings = settings
        self.run = run
        self.keys = RedisKeys(settings.redis_prefix)
        self.ttl_s = ttl_s or settings.payload_ttl_s
        self.redis = redis_client(settings)
        self._put_frames = self.redis.register_script(_PUT_FRAMES)
        self._put_feature = self.redis.register_script(_PUT_FEATURE)
        self._take = self.redis.register_script(_TAKE)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._abandon = self.redis.register_script(_ABANDON)

    def _call(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ServiceUnavailable("Redis", f"{self.settings.redis_host}:{self.settings.redis_port}",
                                     exc) from None

    # -- keys -------------------------------------------------------------------------------------
    def frames_key(self, sample_id: str) -> str:
        return self.keys.frames(self.run, sample_id)

    def feature_key(self, stream: str, sample_id: str) -> str:
        return self.keys.feature(self.run, stream, sample_id)

    def state_key(self, sample_id: str) -> str:
        return self.keys.sample_state(self.run, sample_id)

    # -- in flight --------------------------------------------------------------------------------
    def acquire(self, sample_id: str, limit: int) -> bool:
        """Take an in-flight slot for the sample (idempotent); False when the run is at ``limit``."""
        keys = [self.keys.inflight(self.run)]
        return bool(self._call(self._acquire, keys=keys, args=[sample_id, limit, self.ttl_s]))

    def inflight(self) -> int:
        return int(self._call(self.redis.zcard, self.keys.inflight(self.run)))

    # -- frames -----------------------------------------------------------------------------------
    def put_frames(self, sample_id: str, frames: np.ndarray, streams: list[str]) -> int:
        """Store the frames for the streams that still need them; returns how many do."""
        data, shape, dtype = _encode_array(frames)
        keys = [self.frames_key(sample_id), self.state_key(sample_id)]
        return int(self._call(self._put_frames, keys=keys, args=[self.ttl_s, data, shape, dtype, *streams]))

    def get_frames(self, sample_id: str) -> np.ndarray | None:
        values = self._call(self.redis.hmget, self.frames_key(sample_id), "data", "shape", "dtype")
        if values[0] is None:
            return None
        return _decode_array(*values)

    def stream_state(self, sample_id: str, stream: str) -> int | None:
        value = self._call(self.redis.hget, self.state_key(sample_id), f"k:{stream}")
        return None if value is None else int(value)

    # -- features ---------------------------------------------------------------------------------
    def feature_meta(self, stream: str, sample_id: str) -> tuple[list[int], str] | None:
        """Shape and dtype of a stored feature (not its bytes), or None when it is not in Redis."""
        shape, dtype = self._call(self.redis.hmget, self.feature_key(stream, sample_id), ["shape", "dtype"])
        if shape is None or dtype is None:
            return None
        shape_s = shape.decode() if isinstance(shape, bytes) else shape
        return [int(d) for d in shape_s.split(",") if d], dtype.decode() if isinstance(dtype, bytes) else dtype

    def put_feature(self, stream: str, sample_id: str, feature: np.ndarray) -> int | None:
        """Store one stream's feature; returns the stream's previous state (None if unknown)."""
        data, shape, dtype = _encode_array(feature)
        keys = [self.feature_key(stream, sample_id), self.state_key(sample_id), self.frames_key(sample_id)]
        before = int(self._call(self._put_feature, keys=keys, args=[self.ttl_s, stream, data, shape, dtype]))
        return None if before < 0 else before

    def take(self, stream: str, sample_id: str) -> Taken:
        """Read and delete one stream's feature of the sample, releasing its slot when it is the last."""
        keys = [self.feature_key(stream, sample_id), self.state_key(sample_id),
                self.keys.inflight(self.run), self.frames_key(sample_id)]
        result = self._call(self._take, keys=keys, args=[stream, sample_id])
        status = int(result[0])
        if status == 1:
            return Taken("taken", _decode_array(result[1], result[2], result[3]))
        return Taken("duplicate" if status == 2 else "lost")

    def abandon(self, sample_id: str, streams: list[str], stream: str | None = None) -> None:
        """Give up a sample for one stream (or all): its payloads go and its slot is freed when no
        stream is left waiting for it."""
        doomed = [self.feature_key(s, sample_id) for s in ([stream] if stream else streams)]
        keys = [self.state_key(sample_id), self.keys.inflight(self.run), self.frames_key(sample_id), *doomed]
        # A sample that failed before its state existed (decode error) still knows its streams.
        self._call(self.redis.hsetnx, self.state_key(sample_id), "streams", ",".join(streams))
        self._call(self._abandon, keys=keys, args=[sample_id, stream or "", self.ttl_s])

    def reset(self, sample_ids: list[str]) -> int:
        """Forget the progress of these samples (state, payloads, in-flight slots), so that a
        re-published epoch is delivered again; returns the keys deleted."""
        if not sample_ids:
            return 0
        deleted = 0
        ids = set(sample_ids)
        pipe = self.redis.pipeline(transaction=False)
        for sample_id in sample_ids:
            pipe.delete(self.state_key(sample_id), self.frames_key(sample_id))
        for key in self.redis.scan_iter(match=f"{self.keys.prefix}:{self.run}:feat:*", count=1000):
            if key.decode().rsplit(":", 1)[1] in ids:
                pipe.delete(key)
        pipe.zrem(self.keys.inflight(self.run), *sample_ids)
        for result in self._call(pipe.execute)[:-1]:
            deleted += int(result)
        return deleted

    # -- run ----------------------------------------------------------------------------------------
    def payload_bytes(self) -> int:
        """Bytes of this run's frames and features now in Redis (for tests and benchmarks)."""
        total = 0
        for pattern in (f"{self.keys.prefix}:{self.run}:frames:*", f"{self.keys.prefix}:{self.run}:feat:*"):
            for key in self.redis.scan_iter(match=pattern, count=1000):
                total += int(self.redis.hstrlen(key, "data") or 0)
        return total

    def clear(self) -> int:
        """Delete every key of the run (end of run, tests)."""
        keys = list(self.redis.scan_iter(match=f"{self.keys.prefix}:{self.run}:*", count=1000))
        if keys:
            self.redis.delete(*keys)
        return len(keys)
