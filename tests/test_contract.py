from __future__ import annotations

import json

import pytest

from essp.contract import (
    ControlCommand,
    DeadLetter,
    DecodeChunk,
    DecodeJob,
    FeatureReady,
    FramesReady,
    RedisKeys,
    SmokePing,
    Topics,
    WorkerEvent,
    decode,
    encode,
)
from essp.errors import MalformedMessage

JOB = DecodeJob(run="r1", epoch=2, sample_id="e2-00017", video="s3://essp-videos/a/v_1.mp4", label=3,
                offset=40, length=10, height=224, width=224)


@pytest.mark.parametrize("message", [
    JOB,
    DecodeChunk(jobs=[JOB, JOB.model_copy(update={"sample_id": "e2-00018"})]),
    FramesReady(jobs=[JOB], pix_fmt="gray"),
    FeatureReady(jobs=[JOB], extractor="flow", stream="flow"),
    ControlCommand(command="pause", run="r1"),
    WorkerEvent(event="heartbeat", worker_id="decode-1", worker_kind="decode", counters={"jobs": 3}),
    DeadLetter(reason="moov atom not found", source_topic="essp.r1.decode", payload_b64="eA=="),
    SmokePing(token="abc"),
])
def test_every_message_kind_round_trips(message):
    assert decode(encode(message), "topic") == message


@pytest.mark.parametrize(("raw", "reason"), [
    (None, "empty message"),
    (b"\xff\xfe", "not JSON"),
    (b"{not json", "not JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b'{"v": 1}', "unknown message kind None"),
    (b'{"kind": "decode_job", "v": 7}', "schema version 7 is not supported"),
    (json.dumps({**json.loads(encode(JOB)), "epoch": -1}).encode(), "epoch: Input should be greater"),
    (json.dumps({**json.loads(encode(JOB)), "extra": 1}).encode(), "extra: Extra inputs are not permitted"),
    (json.dumps({k: v for k, v in json.loads(encode(JOB)).items() if k != "video"}).encode(),
     "video: Field required"),
])
def test_malformed_messages_are_rejected_with_a_reason(raw, reason):
    with pytest.raises(MalformedMessage, match="malformed message on essp.r1.decode") as info:
        decode(raw, "essp.r1.decode", (DecodeJob,))
    assert reason in info.value.reason


def test_a_valid_message_of_the_wrong_kind_is_malformed_on_that_topic():
    with pytest.raises(MalformedMessage, match="does not belong here"):
        decode(encode(SmokePing(token="x")), "essp.r1.decode", (DecodeJob,))


def test_topic_and_key_names_come_from_one_place():
    topics, keys = Topics("essp"), RedisKeys("essp")
    assert topics.decode("r1", 3) == "essp.r1.e0003.decode"
    assert topics.ready("r1", "temporal", 12) == "essp.r1.e0012.ready.temporal"
    assert topics.run_dead("r1") == "essp.r1.dead"
    assert topics.run_topics("r1", ["rgb"], 0) == ["essp.r1.e0000.decode", "essp.r1.e0000.frames",
                                                   "essp.r1.e0000.ready.rgb", "essp.r1.dead"]
    assert set(topics.shared()) == {"essp.control", "essp.events", "essp.dead", "essp.smoke"}
    assert keys.frames("r1", "s9") == "essp:r1:frames:s9"
    assert keys.feature("r1", "flow-dis", "s9") == "essp:r1:feat:flow-dis:s9"


@pytest.mark.parametrize("run", ["", "has space", "a.b", "-lead", "x" * 65, "r/1"])
def test_unsafe_run_ids_are_refused(run):
    with pytest.raises(ValueError, match="run id"):
        Topics().decode(run, 0)


@pytest.mark.parametrize("epoch", [-1, 1.5, True, "3"])
def test_bad_epochs_are_refused_in_topic_names(epoch):
    with pytest.raises(ValueError, match="epoch"):
        Topics().decode("r1", epoch)


def test_a_chunk_holds_one_epoch_of_one_run_and_each_sample_once():
    other_epoch = JOB.model_copy(update={"epoch": 3, "sample_id": "e3-00001"})
    with pytest.raises(ValueError, match="one epoch of one run"):
        DecodeChunk(jobs=[JOB, other_epoch])
    with pytest.raises(ValueError, match="names each sample once"):
        FramesReady(jobs=[JOB, JOB])
    with pytest.raises(ValueError, match="at least 1"):
        FeatureReady(jobs=[], extractor="flow", stream="flow")
    chunk = DecodeChunk(jobs=[JOB, JOB.model_copy(update={"sample_id": "e2-00018"})])
    assert (chunk.run, chunk.epoch, chunk.sample_ids()) == ("r1", 2, ["e2-00017", "e2-00018"])


def test_decode_job_checks_its_run_its_streams_and_its_range():
    with pytest.raises(ValueError, match="run id"):
        DecodeJob(**{**JOB.model_dump(), "run": "bad run"})
    with pytest.raises(ValueError, match="stream name"):
        DecodeJob(**{**JOB.model_dump(), "features": {"Flow!": {}}})
    with pytest.raises(ValueError, match="runs past the video's 45 frames"):
        DecodeJob(**{**JOB.model_dump(), "video_frames": 45})
    assert DecodeJob(**{**JOB.model_dump(), "video_frames": 51}).video_frames == 51


def test_patterns_match_run_topics_only():
    import re

    topics = Topics("tp")
    assert re.match(topics.decode_pattern(), topics.decode("run-1", 0))
    assert re.match(topics.decode_pattern(), topics.decode("run-1", 12345))
    assert not re.match(topics.decode_pattern(), topics.frames("run-1", 0))
    assert not re.match(topics.decode_pattern(), "other.run-1.e0000.decode")
    assert not re.match(topics.decode_pattern(), "tp.run-1.decode")
    assert re.match(topics.decode_pattern("run-1"), topics.decode("run-1", 4))
    assert not re.match(topics.decode_pattern("run-1"), topics.decode("run-2", 4))
    # A consumer of one stream reads that stream's ready topics of every epoch, and the run's dead letters.
    ready = topics.ready_pattern("run-1", "flow")
    assert re.match(ready, topics.ready("run-1", "flow", 0)) and re.match(ready, topics.ready("run-1", "flow", 7))
    assert re.match(ready, topics.run_dead("run-1"))
    assert not re.match(ready, topics.ready("run-1", "rgb", 0))
    assert not re.match(ready, topics.ready("run-12", "flow", 0))
    assert not re.match(ready, topics.run_dead("run-2"))
    assert topics.run_of(topics.ready("run-1", "flow", 3)) == "run-1"
    assert topics.epoch_of(topics.ready("run-1", "flow", 3)) == 3
    assert topics.epoch_of(topics.run_dead("run-1")) is None
    assert topics.is_run_topic(topics.frames("run-1", 0), "run-1")
    assert not topics.is_run_topic(topics.frames("run-12", 0), "run-1")
    with pytest.raises(ValueError):
        topics.run_of("tp.control")
