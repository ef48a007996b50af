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
