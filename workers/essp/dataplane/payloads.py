"""Redis side of the data plane: frames and features of each sample, their progress, and the
in-flight bound that gives back-pressure.

Per sample ``s`` of run ``r`` there are three kinds of keys (names in :class:`essp.contract.RedisKeys`):

* ``frames:s`` — the decoded frames, deleted as soon as every extractor the sample needs has run;
* ``feat:<kind>:s`` — one feature per extractor kind (= stream), deleted when the consumer takes it;
* ``state:s`` — one field per stream, ``k:<stream>`` = 0 (to extract), 1 (extracted, waiting for its
  consumer) or 2 (consumed); it makes every step idempotent, so a redone job (at-least-once delivery)
  never double counts, and tells a consumer that finds no payload whether it is a duplicate notice or a
  lost payload (expired, or Redis restarted) that must be decoded again.

Payloads are plain strings written with SET and read with GET/MGET, pipelined a chunk at a time: a
self-describing array (:func:`encode_array`: a 6-byte head, ``dtype;shape``, then the C-order bytes), or
for frames a grey stack and a few colour frames together (:func:`encode_frames`),
so that megabytes never pass through a Lua script (which copies them into and out of the script's
interpreter). Only the small state logic runs in Lua, in the same MULTI/EXEC as the payload command,
so a payload and its state change together; one round trip moves a whole chunk.

The run's ``inflight`` sorted set holds the samples between decode and consumption. A decode worker
adds its samples before it decodes them and waits while the set is full (:meth:`SampleStore.acquire_many`);
the consumer removes a sample when the last of its streams is taken. Entries older than the payload TTL
are dropped, since their payloads have expired anyway. Every key has the TTL, so an abandoned run cleans
itself up; a sample's state lives four times as long as its payloads, so that a stream far behind another
still finds what the others did when its own payload has expired (it is redone for that stream only).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import redis

from essp.clients.redis import redis_client
from essp.contract import RedisKeys
from essp.dataplane.extractors import MixedFrames
from essp.errors import ServiceSaturated, ServiceUnavailable
from essp.settings import Settings

TO_EXTRACT, EXTRACTED, CONSUMED = 0, 1, 2

# KEYS: state, inflight. ARGV: ttl, sample_id, stream...
# Marks new streams "to extract" (a redo keeps what already progressed). Returns how many streams still
# need extraction (0: the frames just stored are not needed, and the caller deletes them). A redo of a
# sample every stream already consumed gives back the slot its decode worker just took for it: nobody
# else would (found by the fault suite: a worker killed after its notice went out, before its commit,
# had its chunk redone by the next owner, and each such redo leaked a chunk of slots until the run
# stalled at its bound).
_MARK_FRAMES = """
local ttl = tonumber(ARGV[1])
local todo, live = 0, 0
for i = 3, #ARGV do
  local field = 'k:' .. ARGV[i]
  local st = redis.call('HGET', KEYS[1], field)
  if not st then
    redis.call('HSET', KEYS[1], field, 0)
    st = '0'
  end
  if st == '0' then todo = todo + 1 end
  if st ~= '2' then live = live + 1 end
end
redis.call('HSET', KEYS[1], 'streams', table.concat(ARGV, ',', 3))
redis.call('EXPIRE', KEYS[1], ttl * 4)
if live == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return todo
"""

# KEYS: feature, state, frames. ARGV: ttl, stream.
# Runs right after the SET of the feature: moves the stream to "extracted" unless it already moved on
# (a redo of a consumed sample: the feature just stored is deleted again), and deletes the frames once
# no stream needs them. Returns the stream's state before the call (nil -> -1).
_MARK_FEATURE = """
local ttl = tonumber(ARGV[1])
local field = 'k:' .. ARGV[2]
local st = redis.call('HGET', KEYS[2], field)
if st == '2' then
  redis.call('DEL', KEYS[1])
  return 2
end
redis.call('HSET', KEYS[2], field, 1)
redis.call('EXPIRE', KEYS[2], ttl * 4)
local streams = redis.call('HGET', KEYS[2], 'streams') or ''
local todo = 0
for s in string.gmatch(streams, '[^,]+') do
  if redis.call('HGET', KEYS[2], 'k:' .. s) == '0' then todo = todo + 1 end
end
if todo == 0 then redis.call('DEL', KEYS[3]) end
if not st then return -1 end
return tonumber(st)
"""

# The same with the payload as ARGV[3], SET by the script itself, which may run while Redis is at its
# maxmemory: an extractor's write is what frees its frames, so refusing it there would deadlock a full
# Redis (found by the fault suite: frames filled Redis, no feature could be written, nothing drained).
# Only the sources (decode) are refused at the limit; the stages after them always proceed, and the
# overshoot is bounded by the in-flight bound. Used only when the plain SET was refused (Lua copies the
# payload into and out of its interpreter).
_PUT_FEATURE_ALLOW_OOM = ("#!lua flags=allow-oom\nredis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[1])\n"
                          + _MARK_FEATURE)

# KEYS: feature, state, inflight, frames. ARGV: stream, sample_id.
# Runs right after the GET of the feature (same MULTI): deletes it, marks the stream consumed, and frees
# the in-flight slot when every stream of the sample is consumed. Returns 1 = taken, 2 = already consumed
# (a duplicate notice), 0 = lost (no payload and not consumed: the stream goes back to "to extract";
# found by the fault suite: an rgb feature that expired while flow had consumed kept its "extracted"
# state, so its redo stored nothing and the sample never arrived).
_TAKE = """#!lua flags=allow-oom
local field = 'k:' .. ARGV[1]
if redis.call('EXISTS', KEYS[1]) == 0 then
  local st = redis.call('HGET', KEYS[2], field)
  if st == '2' then return 2 end
  -- Lost (expired, or Redis restarted): back to "to extract", so that the redo the consumer asks for
  -- stores frames again and this stream extracts anew (the other streams keep what they did).
  if st then redis.call('HSET', KEYS[2], field, 0) end
  return 0
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
return 1
"""

# KEYS: inflight. ARGV: limit, ttl, least, sample_id... Gives slots to the samples in order (a redo keeps
# its slot) and stops at the first that finds the run at its bound. Fewer than ``least`` granted: none is
# (the new slots are given back), so that a waiting worker holds nothing. Returns how many hold a slot.
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local limit = tonumber(ARGV[1])
local least = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
local granted = 0
local added = {}
for i = 4, #ARGV do
  if not redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    if redis.call('ZCARD', KEYS[1]) >= limit then break end
    redis.call('ZADD', KEYS[1], now, ARGV[i])
    added[#added + 1] = ARGV[i]
  end
  granted = granted + 1
end
if granted < least then
  if #added > 0 then redis.call('ZREM', KEYS[1], unpack(added)) end
  return 0
end
if granted > 0 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return granted
"""

# Taking and abandoning free memory: they run when Redis is at its maxmemory (allow-oom), or a full
# Redis could never drain (the workers wait on it as back-pressure, see SampleStore._call).
# KEYS: state, inflight, frames, feature... ARGV: sample_id, stream or '' (every stream), ttl.
# A sample that will never reach its consumer (decode or extraction failed): mark the stream(s)
# consumed, drop their payloads, and free the slot when nothing of the sample is left to consume.
_ABANDON = """#!lua flags=allow-oom
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
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]) * 4)
return live
"""

_MAGIC = b"EA"  # "ESSP array"; then a u32 head length, the head "dtype;d0,d1,...", then the data
_HEAD = struct.Struct("<2sI")


class PayloadError(ValueError):
    """Bytes in a payload key that are not an array written by :func:`encode_array`."""


def encode_array(array: np.ndarray) -> bytes:
    """One self-describing payload: head (dtype and shape) then the array's C-order bytes."""
    array = np.ascontiguousarray(array)
    head = f"{array.dtype.str};{','.join(str(d) for d in array.shape)}".encode()
    return b"".join((_HEAD.pack(_MAGIC, len(head)), head, memoryview(array.reshape(-1).view(np.uint8))))


def _parse_head(data: bytes | memoryview) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(data) < _HEAD.size:
        raise PayloadError(f"payload of {len(data)} bytes is shorter than its head")
    magic, size = _HEAD.unpack_from(data)
    if magic != _MAGIC or len(data) < _HEAD.size + size:
        raise PayloadError("payload does not start with an ESSP array head")
    dtype_s, _, shape_s = bytes(data[_HEAD.size:_HEAD.size + size]).decode("ascii").partition(";")
    return np.dtype(dtype_s), tuple(int(d) for d in shape_s.split(",") if d), _HEAD.size + size


def decode_array(data: bytes | memoryview) -> np.ndarray:
    """The array of a payload (a read-only view of ``data``: nothing is copied)."""
    dtype, shape, start = _parse_head(data)
    array = np.frombuffer(data, dtype=dtype, offset=start)
    if array.size != int(np.prod(shape)):
        raise PayloadError(f"payload holds {array.size} values, its head says shape {shape}")
    return array.reshape(shape)


# A sample's frames as a grey stack and a few colour frames (essp.dataplane.extractors.MixedFrames):
# "EF", u32 count (L+1), u8 has-grey, u32 k, k u32 positions, then the grey stack and the (k, H, W, 3)
# colour frames, each an encode_array payload after its u64 length.
_MIXED = b"EF"
_MIXED_HEAD = struct.Struct("<2sIBI")
_PART = struct.Struct("<Q")


def encode_frames(frames: np.ndarray | MixedFrames) -> bytes:
    """A frames payload: one array (a stack), or a grey stack and some colour frames."""
    if isinstance(frames, np.ndarray):
        return encode_array(frames)
    positions = sorted(frames.colour)
    parts = [_MIXED_HEAD.pack(_MIXED, frames.count, frames.gray is not None, len(positions)),
             struct.pack(f"<{len(positions)}I", *positions)]
    arrays = ([] if frames.gray is None else [frames.gray]) + (
        [np.stack([frames.colour[i] for i in positions])] if positions else [])
    for array in arrays:
        encoded = encode_array(array)
        parts += [_PART.pack(len(encoded)), encoded]
    return b"".join(parts)


def decode_frames(data: bytes) -> np.ndarray | MixedFrames:
    """What :func:`encode_frames` wrote (views of ``data``: nothing is copied)."""
    if data[:2] != _MIXED:
        return decode_array(data)
    if len(data) < _MIXED_HEAD.size:
        raise PayloadError(f"frames payload of {len(data)} bytes is shorter than its head")
    _, count, has_gray, k = _MIXED_HEAD.unpack_from(data)
    at = _MIXED_HEAD.size + 4 * k
    if len(data) < at:
        raise PayloadError("frames payload is shorter than its list of colour frames")
    positions = struct.unpack_from(f"<{k}I", data, _MIXED_HEAD.size)
    view, arrays = memoryview(data), []
    for _ in range(int(has_gray) + (1 if k else 0)):
        if len(data) < at + _PART.size:
            raise PayloadError("frames payload ends before one of its arrays")
        (size,) = _PART.unpack_from(data, at)
        arrays.append(decode_array(view[at + _PART.size:at + _PART.size + size]))
        at += _PART.size + size
    gray = arrays.pop(0) if has_gray else None
    colour = arrays[0] if k else np.empty((0,), np.uint8)
    if k and colour.shape[0] != k:
        raise PayloadError(f"frames payload names {k} colour frames and holds {colour.shape[0]}")
    return MixedFrames(count, gray, {p: colour[i] for i, p in enumerate(positions)})


@dataclass(frozen=True)
class Taken:
    """What :meth:`SampleStore.take_many` found for one sample: the array, or why there is none."""

    status: str  # "taken" | "duplicate" | "lost"
    array: np.ndarray | None = None


class SampleStore:
    """Frames, features, sample progress and the in-flight bound of one run, in Redis."""

    def __init__(self, settings: Settings, run: str, *, ttl_s: int | None = None) -> None:
        self.settings = settings
        self.run = run
        self.keys = RedisKeys(settings.redis_prefix)
        self.ttl_s = ttl_s or settings.payload_ttl_s
        self.redis = redis_client(settings)
        self._mark_frames = self.redis.register_script(_MARK_FRAMES)
        self._mark_feature = self.redis.register_script(_MARK_FEATURE)
        self._put_feature_oom = self.redis.register_script(_PUT_FEATURE_ALLOW_OOM)
        self._take = self.redis.register_script(_TAKE)
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._abandon = self.redis.register_script(_ABANDON)

    def _call(self, fn, *args, **kwargs):  # noqa: ANN001, ANN202
        address = f"{self.settings.redis_host}:{self.settings.redis_port}"
        try:
            return fn(*args, **kwargs)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise ServiceUnavailable("Redis", address, exc) from None
        except redis.ResponseError as exc:
            if isinstance(exc, redis.exceptions.OutOfMemoryError) or "maxmemory" in str(exc):
                # At maxmemory (noeviction): back-pressure, never a dropped payload.
                raise ServiceSaturated(
                    "Redis", address, exc, "at its maxmemory: the workers wait until consumers free payloads; "
                    "raise maxmemory (ESSP_REDIS_MAXMEMORY_MB for the local one) or lower max_inflight") from None
            raise

    def _transaction(self, build, *, transaction: bool = True) -> list:  # noqa: ANN001
        """Run the commands ``build(pipe)`` queues as one MULTI/EXEC (one round trip); ``transaction=False``:
        pipelined only (Redis 7.0 refuses even an allow-oom script inside MULTI at its maxmemory)."""
        pipe = self.redis.pipeline(transaction=transaction)
        build(pipe)
        return self._call(pipe.execute)

    # -- keys -------------------------------------------------------------------------------------
    def start_attempt(self, video: str, finished: Sequence[str] = ()) -> int:
        """Count one more decode of the video begun, and clear the counts of the videos whose decodes just
        ``finished`` (same round trip); returns how many began and never finished (a worker that crashed
        or hung on the video left its count behind)."""
        key = self.keys.decode_attempts(self.run)
        pipe = self.redis.pipeline(transaction=False)
        if finished:
            pipe.hdel(key, *set(finished))
        pipe.hincrby(key, video, 1)
        pipe.expire(key, self.ttl_s * 4)
        return int(self._call(pipe.execute)[-2])

    def finish_attempts(self, videos: Sequence[str]) -> None:
        if videos:
            self._call(self.redis.hdel, self.keys.decode_attempts(self.run), *set(videos))

    def quarantine(self, video: str, reason: str) -> None:
        """Record a video the run's next epochs leave out (essp.dataplane.plan.record_decode_quarantine)."""
        self._call(self.redis.hset, self.keys.quarantine(self.run), video, reason)

    def frames_key(self, sample_id: str) -> str:
        return self.keys.frames(self.run, sample_id)

    def feature_key(self, stream: str, sample_id: str) -> str:
        return self.keys.feature(self.run, stream, sample_id)

    def state_key(self, sample_id: str) -> str:
        return self.keys.sample_state(self.run, sample_id)

    # -- in flight --------------------------------------------------------------------------------
    def acquire_many(self, sample_ids: Sequence[str], limit: int, *, least: int = 1) -> int:
        """Take in-flight slots for the samples in order (idempotent per sample); returns how many of
        the first ones hold a slot (fewer than asked when the run reached ``limit``), and 0 when fewer
        than ``least`` would: then none is taken."""
        if not sample_ids:
            return 0
        keys = [self.keys.inflight(self.run)]
        least = max(1, min(least, len(sample_ids)))
        return int(self._call(self._acquire, keys=keys, args=[limit, self.ttl_s, least, *sample_ids]))

    def acquire(self, sample_id: str, limit: int) -> bool:
        """Take an in-flight slot for the sample (idempotent); False when the run is at ``limit``."""
        return self.acquire_many([sample_id], limit) == 1

    def inflight(self) -> int:
        return int(self._call(self.redis.zcard, self.keys.inflight(self.run)))

    # -- frames -----------------------------------------------------------------------------------
    def put_frames_many(self, items: Sequence[tuple[str, np.ndarray | MixedFrames, list[str]]]) -> list[int]:
        """Store the frames of several samples (sample id, frames, streams) in one round trip; returns,
        per sample, how many of its streams still need the frames (0: a redelivered job, nothing stored)."""
        if not items:
            return []

        def build(pipe: redis.client.Pipeline) -> None:
            for sample_id, frames, streams in items:
                pipe.set(self.frames_key(sample_id), encode_frames(frames), ex=self.ttl_s)
                self._mark_frames(keys=[self.state_key(sample_id), self.keys.inflight(self.run)],
                                  args=[self.ttl_s, sample_id, *streams], client=pipe)

        results = self._transaction(build)
        todo = [int(n) for n in results[1::2]]
        unneeded = [self.frames_key(sample_id) for (sample_id, _, _), n in zip(items, todo, strict=True) if not n]
        if unneeded:
            self._call(self.redis.delete, *unneeded)
        return todo

    def put_frames(self, sample_id: str, frames: np.ndarray | MixedFrames, streams: list[str]) -> int:
        """Store the frames for the streams that still need them; returns how many do."""
        return self.put_frames_many([(sample_id, frames, streams)])[0]

    def get_frames_many(self, sample_ids: Sequence[str]) -> list[np.ndarray | MixedFrames | None]:
        """The frames of several samples in one MGET (None where they are gone)."""
        if not sample_ids:
            return []
        values = self._call(self.redis.mget, [self.frames_key(i) for i in sample_ids])
        return [None if value is None else decode_frames(value) for value in values]

    def get_frames(self, sample_id: str) -> np.ndarray | MixedFrames | None:
        return self.get_frames_many([sample_id])[0]

    def stream_states(self, sample_ids: Sequence[str], stream: str) -> list[int | None]:
        """Each sample's state for ``stream`` (TO_EXTRACT, EXTRACTED, CONSUMED, or None), one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for sample_id in sample_ids:
            pipe.hget(self.state_key(sample_id), f"k:{stream}")
        return [None if value is None else int(value) for value in self._call(pipe.execute)]

    def stream_state(self, sample_id: str, stream: str) -> int | None:
        return self.stream_states([sample_id], stream)[0]

    # -- features ---------------------------------------------------------------------------------
    def feature_meta(self, stream: str, sample_id: str) -> tuple[list[int], str] | None:
        """Shape and dtype of a stored feature (read from its head, not its bytes), or None when it is
        not in Redis."""
        head = self._call(self.redis.getrange, self.feature_key(stream, sample_id), 0, 255)
        if not head:
            return None
        dtype, shape, _ = _parse_head(head)
        return list(shape), dtype.name

    def put_features(self, stream: str, items: Sequence[tuple[str, np.ndarray]]) -> list[int | None]:
        """Store one stream's features of several samples in one round trip; returns each stream's
        previous state (None if unknown)."""
        if not items:
            return []

        def build(pipe: redis.client.Pipeline) -> None:
            for sample_id, feature in items:
                keys = [self.feature_key(stream, sample_id), self.state_key(sample_id), self.frames_key(sample_id)]
                pipe.set(keys[0], encode_array(feature), ex=self.ttl_s)
                self._mark_feature(keys=keys, args=[self.ttl_s, stream], client=pipe)

        def build_past_the_limit(pipe: redis.client.Pipeline) -> None:
            for sample_id, feature in items:
                keys = [self.feature_key(stream, sample_id), self.state_key(sample_id), self.frames_key(sample_id)]
                self._put_feature_oom(keys=keys, args=[self.ttl_s, stream, encode_array(feature)], client=pipe)

        try:
            before = [int(n) for n in self._transaction(build)[1::2]]
        except ServiceSaturated:  # at maxmemory: written anyway, since it frees the frames (see above)
            before = [int(n) for n in self._transaction(build_past_the_limit, transaction=False)]
        return [None if n < 0 else n for n in before]

    def put_feature(self, stream: str, sample_id: str, feature: np.ndarray) -> int | None:
        """Store one stream's feature; returns the stream's previous state (None if unknown)."""
        return self.put_features(stream, [(sample_id, feature)])[0]

    def take_many(self, stream: str, sample_ids: Sequence[str]) -> list[Taken]:
        """Read and delete one stream's feature of several samples (one MULTI/EXEC), releasing each
        sample's slot when it is the last of its streams."""
        if not sample_ids:
            return []
        inflight = self.keys.inflight(self.run)

        def build(pipe: redis.client.Pipeline) -> None:
            for sample_id in sample_ids:
                keys = [self.feature_key(stream, sample_id), self.state_key(sample_id), inflight,
                        self.frames_key(sample_id)]
                pipe.get(keys[0])
                self._take(keys=keys, args=[stream, sample_id], client=pipe)

        try:
            results = self._transaction(build)
        except ServiceSaturated:
            # At maxmemory the script that frees memory must still run, outside MULTI (see _transaction).
            # Each GET and its take are then not one step: a concurrent taker of the same sample (a
            # redelivered notice) gets "already consumed" from its take and drops what it read.
            results = self._transaction(build, transaction=False)
        taken = []
        for data, status in zip(results[0::2], results[1::2], strict=True):
            if int(status) == 1 and data is not None:
                taken.append(Taken("taken", decode_array(data)))
            else:
                taken.append(Taken("duplicate" if int(status) == 2 else "lost"))
        return taken

    def take(self, stream: str, sample_id: str) -> Taken:
        """Read and delete one stream's feature of the sample, releasing its slot when it is the last."""
        return self.take_many(stream, [sample_id])[0]

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
                total += int(self.redis.strlen(key) or 0)
        return total

    def clear(self) -> int:
        """Delete every key of the run (end of run, tests)."""
        keys = list(self.redis.scan_iter(match=f"{self.keys.prefix}:{self.run}:*", count=1000))
        if keys:
            self.redis.delete(*keys)
        return len(keys)
