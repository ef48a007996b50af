"""The Redis side of the data plane on the real Redis: idempotent steps, the in-flight bound, and
the difference between a duplicate notice and a lost payload."""

from __future__ import annotations

import numpy as np
import pytest

from essp.dataplane.payloads import CONSUMED, EXTRACTED, TO_EXTRACT, SampleStore

STREAMS = ["rgb", "flow"]


@pytest.fixture
def store(settings):
    return SampleStore(settings, "run-p", ttl_s=60)


def frames(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (3, 8, 8, 3), dtype=np.uint8)


def test_sample_goes_through_its_states_and_frees_its_slot(store):
    assert store.acquire("s1", limit=4)
    assert store.put_frames("s1", frames(), STREAMS) == 2
    np.testing.assert_array_equal(store.get_frames("s1"), frames())
    assert store.stream_state("s1", "rgb") == TO_EXTRACT

    rgb = np.full((3, 8, 8), 7, np.uint8)
    assert store.put_feature("rgb", "s1", rgb) == TO_EXTRACT
    assert store.get_frames("s1") is not None  # flow still needs them
    assert store.put_feature("flow", "s1", np.zeros((4, 8, 8), np.uint8)) == TO_EXTRACT
    assert store.get_frames("s1") is None  # no stream needs the frames any more
    assert store.stream_state("s1", "flow") == EXTRACTED

    taken = store.take("rgb", "s1")
    assert taken.status == "taken"
    np.testing.assert_array_equal(taken.array, rgb)
    assert store.inflight() == 1  # flow not consumed yet
    assert store.take("flow", "s1").status == "taken"
    assert store.inflight() == 0
    assert store.stream_state("s1", "rgb") == CONSUMED


def test_redone_steps_are_idempotent(store):
    store.acquire("s1", limit=4)
    store.put_frames("s1", frames(), STREAMS)
    store.put_feature("rgb", "s1", np.ones((3, 8, 8), np.uint8))
    # The decode job is delivered again: rgb keeps its feature, only flow still needs frames.
    assert store.put_frames("s1", frames(), STREAMS) == 1
    assert store.take("rgb", "s1").status == "taken"
    # A late redo of rgb's extraction after consumption stores nothing.
    assert store.put_feature("rgb", "s1", np.ones((3, 8, 8), np.uint8)) == CONSUMED
    assert store.take("rgb", "s1").status == "duplicate"
    # A redo of the decode job after everything: no frames are stored again for rgb.
    store.put_feature("flow", "s1", np.ones((4, 8, 8), np.uint8))
    assert store.take("flow", "s1").status == "taken"
    assert store.put_frames("s1", frames(), STREAMS) == 0
    assert store.get_frames("s1") is None
    assert store.acquire("s1", limit=1)  # a redo keeps (re-takes) its own slot


def test_lost_payload_is_told_apart_from_a_duplicate(store, settings):
    store.acquire("s1", limit=4)
    store.put_frames("s1", frames(), ["flow"])
    store.put_feature("flow", "s1", np.ones((4, 8, 8), np.uint8))
    store.redis.delete(store.feature_key("flow", "s1"))  # as if the TTL expired
    assert store.take("flow", "s1").status == "lost"
    assert store.take("flow", "never-made").status == "lost"


def test_in_flight_bound(store):
    assert all(store.acquire(f"s{i}", limit=3) for i in range(3))
    assert not store.acquire("s3", limit=3)
    assert store.acquire("s1", limit=3)  # already holds a slot
    for i in range(3):
        store.put_frames(f"s{i}", frames(i), ["rgb"])
    store.put_feature("rgb", "s0", np.ones((3, 8, 8), np.uint8))
    store.take("rgb", "s0")
    assert store.acquire("s3", limit=3)
    assert store.inflight() == 3


def test_abandon_frees_the_slot_and_the_payloads(store):
    store.acquire("bad", limit=2)
    store.abandon("bad", STREAMS)  # decode failed: nothing was stored yet
    assert store.inflight() == 0
    store.acquire("half", limit=2)
    store.put_frames("half", frames(), STREAMS)
    store.put_feature("rgb", "half", np.ones((3, 8, 8), np.uint8))
    store.abandon("half", STREAMS, stream="flow")  # flow's extractor failed; rgb still delivers
    assert store.get_frames("half") is None
    assert store.inflight() == 1
    assert store.take("rgb", "half").status == "taken"
    assert store.inflight() == 0
    assert store.clear() >= 1


def test_a_chunk_moves_in_one_round_trip_each_way_and_stays_per_sample(store):
    ids = [f"c{i}" for i in range(5)]
    assert store.acquire_many(ids, limit=8) == 5
    gray = [np.random.default_rng(i).integers(0, 255, (3, 8, 8), dtype=np.uint8) for i in range(5)]
    assert store.put_frames_many([(i, g, ["flow"]) for i, g in zip(ids, gray, strict=True)]) == [1] * 5
    for got, want in zip(store.get_frames_many(ids), gray, strict=True):
        np.testing.assert_array_equal(got, want)  # a grey stack keeps its shape: the payload says it
    assert store.stream_states(ids, "flow") == [TO_EXTRACT] * 5
    feats = [np.full((4, 8, 8), i, np.uint8) for i in range(5)]
    assert store.put_features("flow", list(zip(ids, feats, strict=True))) == [TO_EXTRACT] * 5
    assert store.get_frames_many(ids) == [None] * 5  # no stream needs them any more
    assert store.feature_meta("flow", "c3") == ([4, 8, 8], "uint8")
    store.redis.delete(store.feature_key("flow", "c1"))  # one payload of the chunk lost
    taken = store.take_many("flow", ids)
    assert [t.status for t in taken] == ["taken", "lost", "taken", "taken", "taken"]
    assert [int(t.array[0, 0, 0]) for t in taken if t.array is not None] == [0, 2, 3, 4]
    assert [t.status for t in store.take_many("flow", ["c0", "c2"])] == ["duplicate", "duplicate"]
    assert store.inflight() == 1  # only the lost sample still holds its slot (it will be redone)


def test_slots_are_granted_in_order_up_to_the_bound(store):
    assert store.acquire_many(["a", "b", "c", "d", "e"], limit=3) == 3
    assert store.acquire_many(["c", "d"], limit=3) == 1  # c holds its slot already, d finds the run full
    store.abandon("a", ["flow"])
    assert store.acquire_many(["d", "e"], limit=3) == 1
    assert store.inflight() == 3
    assert store.acquire_many([], limit=3) == 0


def test_a_chunk_takes_its_slots_all_at_once_or_none(store):
    assert store.acquire_many(["a", "b", "c"], limit=8) == 3
    # Five free: a chunk of six asking for all of them gets none, and holds none while it waits.
    chunk = [f"k{i}" for i in range(6)]
    assert store.acquire_many(chunk, limit=8, least=6) == 0
    assert store.inflight() == 3
    assert store.acquire_many(chunk, limit=8, least=4) == 5  # enough for the least it accepts
    assert store.inflight() == 8
    store.abandon("a", ["flow"])
    assert store.acquire_many(chunk, limit=8, least=6) == 6  # its own five count: it needed one more slot
    assert store.acquire_many(["late"], limit=8, least=5) == 0  # least shrinks to its one sample: still full


def test_payloads_are_self_describing_and_foreign_bytes_are_refused():
    from essp.dataplane.payloads import PayloadError, decode_array, encode_array

    for array in (np.arange(24, dtype=np.uint8).reshape(2, 3, 4), np.ones((5,), np.float32),
                  np.zeros((2, 0, 3), np.uint8), np.asfortranarray(np.arange(6, dtype=np.int16).reshape(2, 3))):
        out = decode_array(encode_array(array))
        assert out.dtype == array.dtype and out.shape == array.shape
        np.testing.assert_array_equal(out, array)
    for bad in (b"", b"xx", b"EA\xff\xff\x00\x00", b"\x00" * 64):
        with pytest.raises(PayloadError):
            decode_array(bad)
    with pytest.raises(PayloadError, match="head says shape"):
        decode_array(encode_array(np.ones((2, 3), np.uint8))[:-1])


def test_a_grey_stack_and_its_colour_frames_travel_as_one_payload(store):
    from essp.dataplane.extractors import MixedFrames
    from essp.dataplane.payloads import PayloadError, decode_frames, encode_frames

    rng = np.random.default_rng(2)
    gray = rng.integers(0, 255, (5, 8, 8), dtype=np.uint8)
    colour = {2: rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)}
    assert store.put_frames("m1", MixedFrames(5, gray, colour), ["rgb", "flow"]) == 2
    got = store.get_frames("m1")
    assert isinstance(got, MixedFrames) and got.count == 5 and sorted(got.colour) == [2]
    np.testing.assert_array_equal(got.gray, gray)
    np.testing.assert_array_equal(got.colour[2], colour[2])
    alone = decode_frames(encode_frames(MixedFrames(5, None, colour)))
    assert alone.gray is None and sorted(alone.colour) == [2]
    payload = encode_frames(MixedFrames(5, gray, colour))
    for broken in (payload[:10], payload[:-7]):
        with pytest.raises(PayloadError):
            decode_frames(broken)


def test_a_redo_of_a_consumed_sample_gives_back_the_slot_it_took(store):
    # A decode worker killed after its notice went out but before its commit: the next owner of the
    # partition redoes the chunk after every stream consumed it. It takes a slot again (acquire cannot
    # tell), stores nothing, and must give the slot back, or each such redo leaks slots until the run
    # stalls at its bound (found by the fault suite, tests/test_faults_plane.py).
    assert store.acquire("s1", limit=4)
    assert store.put_frames("s1", frames(), STREAMS) == 2
    for stream in STREAMS:
        store.put_feature(stream, "s1", np.zeros((3, 8, 8), np.uint8))
        assert store.take(stream, "s1").status == "taken"
    assert store.inflight() == 0
    assert store.acquire("s1", limit=4)  # the redo
    assert store.inflight() == 1
    assert store.put_frames("s1", frames(), STREAMS) == 0
    assert store.inflight() == 0
    assert store.get_frames("s1") is None
    # A redo of a sample one stream still has to consume keeps its slot (that consumer frees it).
    assert store.acquire("s2", limit=4)
    assert store.put_frames("s2", frames(), STREAMS) == 2
    store.put_feature("rgb", "s2", np.zeros((3, 8, 8), np.uint8))
    assert store.take("rgb", "s2").status == "taken"
    assert store.put_frames("s2", frames(), STREAMS) == 1
    assert store.inflight() == 1


def test_a_feature_that_expired_while_another_stream_went_on_is_made_again(store, settings):
    # rgb far behind flow: flow consumed the sample, rgb's feature expired. The consumer finds it lost
    # and asks for a redo; the redo must store the frames again for rgb (not see "extracted" and store
    # nothing: the sample would never arrive).
    from essp.clients.redis import redis_client

    assert store.acquire("s1", limit=4)
    assert store.put_frames("s1", frames(), STREAMS) == 2
    store.put_feature("rgb", "s1", np.zeros((3, 8, 8), np.uint8))
    store.put_feature("flow", "s1", np.zeros((4, 8, 8), np.uint8))
    assert store.take("flow", "s1").status == "taken"
    redis_client(settings).delete(store.feature_key("rgb", "s1"))  # expired
    assert store.take("rgb", "s1").status == "lost"
    assert store.put_frames("s1", frames(), STREAMS) == 1  # the redo: rgb needs the frames again
    assert store.stream_state("s1", "flow") == CONSUMED
    assert store.put_feature("rgb", "s1", np.ones((3, 8, 8), np.uint8)) == TO_EXTRACT
    taken = store.take("rgb", "s1")
    assert taken.status == "taken" and int(taken.array.max()) == 1
    assert store.inflight() == 0
    # Progress outlives payloads: the state's TTL is four times theirs.
    assert redis_client(settings).ttl(store.state_key("s1")) > 3 * 60
