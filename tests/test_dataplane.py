"""The streaming data plane end to end on the real services: a synthetic dataset ingested to S3,
epochs planned to Kafka, decoded and extracted by resident worker processes, consumed from Redis.

One module-scoped set of workers (2 decode, 2 flow, 1 rgb) serves every test here, as resident
workers serve every run; each test uses its own run id.
"""

from __future__ import annotations

import threading
import time
import uuid

import numpy as np
import pytest
from conftest import _cleanup

from essp.clients.kafka import MessageConsumer, MessageProducer, ensure_topics
from essp.clients.redis import redis_client
from essp.clients.s3 import ObjectStore, S3Uri
from essp.contract import DeadLetter, FramesReady, RedisKeys, Topics, WorkerEvent
from essp.dataplane.consumer import SampleStream
from essp.dataplane.extractors import dequantise_flow
from essp.dataplane.payloads import SampleStore
from essp.dataplane.plan import plan_epoch, publish_plan, record_decode_quarantine
from essp.dataplane.resident import publish_control
from essp.datasets.ingest import ingest_directory
from essp.datasets.manifest import ManifestStore
from essp.datasets.synth import synthesize
from essp.datasets.video import decode_segment
from essp.deploy.local import LocalProcesses, worker_args, worker_name
from essp.stack.services import isolated_settings

pytestmark = pytest.mark.slow

FEATURES = {"rgb": {}, "flow": {"method": "dis_fast"}}
# The module's resident workers by role, named as the fleet names them (the name is also the worker id).
ROLES = {"decode-a": worker_name("decode", 0), "decode-b": worker_name("decode", 1),
         "flow-a": worker_name("flow", 0), "flow-b": worker_name("flow", 1), "rgb-a": worker_name("rgb", 0)}
L, SIZE = 4, 32


@pytest.fixture(scope="module")
def plane(base_settings, tmp_path_factory):
    """Isolated settings, an ingested dataset, and resident workers for the whole module."""
    tag = "t" + uuid.uuid4().hex[:10]
    settings = isolated_settings(base_settings, tag).model_copy(update={"heartbeat_s": 1.0})
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, classes=3, videos_per_class=6, frames=20, height=48, width=48, keyint=6, seed=3)
    manifest, _ = ingest_directory(settings, root, "tiny")
    # Damage two videos after ingest: one's bytes are garbage, the other is gone. Their samples
    # must be dead-lettered at decode while the epoch completes.
    store = ObjectStore(settings)
    train = manifest.split("train")
    corrupt, missing = train[0].uri, train[-1].uri
    store.put_bytes(S3Uri.parse(corrupt).bucket, S3Uri.parse(corrupt).key, b"\x00\x00\x00\x18ftypmp42" + b"x" * 5000)
    store.delete(S3Uri.parse(missing).bucket, S3Uri.parse(missing).key)
    topics = Topics(tag)
    ensure_topics(settings, [topics.control, topics.events, topics.dead])
    # The module's own state folder: its workers are started the one way ESSP starts them (essp.deploy.local).
    processes = LocalProcesses(settings, state_dir=tmp_path_factory.mktemp("worker-state"))
    started = processes.start([(ROLES[role], worker_args(role.split("-")[0])) for role in ROLES])
    workers = {role: process for role, process in zip(ROLES, started, strict=True)}
    yield settings, manifest, {"corrupt": corrupt, "missing": missing}, workers
    for worker in workers.values():
        worker.stop()
    _cleanup(settings)


def run_epoch(settings, manifest, run, *, epoch=0, samples=24, max_inflight=64, features=FEATURES,
              during=None, consume_delay=0.0, chunk=None):
    """Plan and publish one epoch, drain every stream, return {stream: {sample_id: Sample}} and stats."""
    plan = plan_epoch(manifest, run=run, epoch=epoch, features=features, length=L, height=SIZE, width=SIZE,
                      samples=samples, max_inflight=max_inflight)
    results, stats, errors = {}, {}, []

    def drain(stream):
        try:
            with SampleStream(settings, run, stream, prefetch=2) as samples_in:
                got = {}
                for i, sample in enumerate(samples_in.epoch(epoch, len(plan.jobs), timeout_s=90)):
                    assert sample.sample_id not in got
                    got[sample.sample_id] = sample
                    if during and stream == "flow":
                        during(i)
                    time.sleep(consume_delay)
                results[stream], stats[stream] = got, samples_in.stats
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=drain, args=(s,)) for s in features]
    for t in threads:
        t.start()
    time.sleep(1.0)  # let the consumers join their groups before the first notice
    publish_plan(settings, plan, chunk=chunk)
    for t in threads:
        t.join(200)
    if errors:
        raise errors[0]
    return plan, results, stats


def dead_letters(settings, run):
    topics = Topics(settings.topic_prefix)
    with MessageConsumer(settings, f"check-{uuid.uuid4().hex[:6]}", [topics.run_dead(run)],
                         dead_letter_topic=topics.dead) as consumer:
        letters = []
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            got = consumer.poll(1.0)
            letters += [r.message for r in got if isinstance(r.message, DeadLetter)]
            if letters and not got:
                break
        return letters


def test_every_planned_sample_arrives_once_and_bad_videos_are_dead_lettered(plane):
    settings, manifest, damaged, _ = plane
    run = "r-all"
    plan, results, stats = run_epoch(settings, manifest, run, samples=30)
    bad = {job.sample_id for job in plan.jobs if job.video in damaged.values()}
    good = {job.sample_id: job for job in plan.jobs if job.sample_id not in bad}
    assert bad, "the plan should hit a damaged video (seeded; widen samples if this fires)"
    for stream, expected_shape in (("rgb", (3, SIZE, SIZE)), ("flow", (2 * L, SIZE, SIZE))):
        assert set(results[stream]) == set(good), stream
        assert stats[stream].dead == len(bad)
        for sample_id, sample in results[stream].items():
            assert sample.label == good[sample_id].label
            assert sample.array.shape == expected_shape and sample.array.dtype == np.uint8
    # The rgb stream gets exactly the middle frame, in colour, although the decode worker stored only that
    # frame in colour beside the grey stack flow takes (extractors.frames_layout).
    store = ObjectStore(settings)
    for sample in list(results["rgb"].values())[:4]:
        job = sample.job
        data = store.get_bytes(S3Uri.parse(job.video).bucket, S3Uri.parse(job.video).key)
        middle = decode_segment(data, job.video, job.offset + L // 2, 1, (SIZE, SIZE), pix_fmt="rgb24")[0]
        np.testing.assert_array_equal(sample.array, middle.transpose(2, 0, 1))
    # The flow that arrives is the motion of each class (synth: TranslateLeft/Right/Up).
    mean_flow: dict[str, list] = {}
    for sample in results["flow"].values():
        flow = dequantise_flow(sample.array, 20.0, stacked=True)
        mean_flow.setdefault(manifest.classes[sample.label], []).append((flow[0::2].mean(), flow[1::2].mean()))
    motion = {name: np.mean(values, axis=0) for name, values in mean_flow.items()}
    assert motion["TranslateLeft"][0] < -0.05 < 0.05 < motion["TranslateRight"][0], motion
    assert motion["TranslateUp"][1] < -0.05, motion
    letters = dead_letters(settings, run)
    assert {letter.sample_id for letter in letters} == bad
    reasons = {letter.video: letter.reason for letter in letters}
    assert set(reasons) == {job.video for job in plan.jobs if job.sample_id in bad}
    for video, reason in reasons.items():
        assert video in reason  # the reason names the video ...
        if video == damaged["missing"]:
            assert "NoSuchKey" in reason  # ... and the cause
    quarantine = redis_client(settings).hgetall(RedisKeys(settings.redis_prefix).quarantine(run))
    assert {k.decode() for k in quarantine} == set(reasons)
    # The next epoch's manifest version quarantines them, and its plan no longer draws them.
    updated, uri = record_decode_quarantine(settings, manifest, run)
    assert uri and updated.version == manifest.version + 1
    assert {(q.uri, q.stage) for q in updated.quarantined if q.stage == "decode"} == {(v, "decode") for v in reasons}
    assert ManifestStore(settings).load(updated.name).version == updated.version
    replanned = plan_epoch(updated, run=run, epoch=1, features=FEATURES, length=L, height=SIZE, width=SIZE,
                           samples=30)
    assert not {job.video for job in replanned.jobs} & set(reasons)
    # Nothing of the run is left in Redis but its bookkeeping: payloads were taken, slots freed.
    store = SampleStore(settings, run)
    assert store.inflight() == 0
    assert store.payload_bytes() == 0


def test_in_flight_bound_holds_while_the_consumer_is_slow(plane):
    settings, manifest, damaged, _ = plane
    run, bound = "r-bound", 4
    store_run = SampleStore(settings, run)
    peak = {"inflight": 0, "bytes": 0, "used_memory": 0}
    client = redis_client(settings)
    baseline = int(client.info("memory")["used_memory"])
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak["inflight"] = max(peak["inflight"], store_run.inflight())
            peak["bytes"] = max(peak["bytes"], store_run.payload_bytes())
            peak["used_memory"] = max(peak["used_memory"], int(client.info("memory")["used_memory"]) - baseline)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # Chunks of 8 against a bound of 4: a decode worker must announce the part of a chunk it holds
        # slots for before it waits for more, or nothing would ever free a slot.
        plan, results, _ = run_epoch(settings, manifest, run, samples=20, max_inflight=bound,
                                     features={"flow": {"method": "dis_ultrafast"}}, consume_delay=0.15, chunk=8)
    finally:
        done.set()
        watcher.join()
    delivered = len(results["flow"])
    assert delivered >= 20 - sum(job.video in damaged.values() for job in plan.jobs)
    frames_bytes = (L + 1) * SIZE * SIZE * 3
    flow_bytes = 2 * L * SIZE * SIZE
    # A slot is taken before decode and freed when the consumer takes the sample; the consumer's
    # own prefetch queue is outside Redis.
    assert 1 <= peak["inflight"] <= bound
    assert peak["bytes"] <= bound * (frames_bytes + flow_bytes)
    # Redis' own figure, with room for its bookkeeping (keys, notices of other tests, allocator).
    assert peak["used_memory"] < bound * (frames_bytes + flow_bytes) + 4 * 1024 * 1024


@pytest.mark.fault
@pytest.mark.long  # fault 1 of tests/test_faults_plane.py kills more, more often, in make test
def test_killing_workers_mid_epoch_loses_no_sample(plane):
    settings, manifest, damaged, workers = plane
    run = "r-kill"
    killed = []

    def kill_some(i):
        if i == 3:
            workers["decode-a"].kill()
            workers["flow-a"].kill()
            killed.append(time.monotonic())

    plan, results, _ = run_epoch(settings, manifest, run, samples=30, during=kill_some)
    assert killed
    good = {job.sample_id for job in plan.jobs if job.video not in damaged.values()}
    assert set(results["flow"]) == good and set(results["rgb"]) == good
    # Bring the module's workers back for the tests that follow (new processes, new names).
    processes = LocalProcesses(settings, state_dir=workers["decode-b"].log_path.parent.parent)
    workers["decode-a"], workers["flow-a"] = processes.start([(worker_name("decode", 2), worker_args("decode")),
                                                              (worker_name("flow", 2), worker_args("flow"))])


def test_a_feature_written_but_never_announced_is_announced_when_redelivered(plane):
    # A flow worker killed after writing a feature to Redis but before its notice was acknowledged:
    # the frames notice comes back (uncommitted) and the next worker must announce the feature, not
    # skip it as a duplicate (the sample would be lost: seen once in CI, 29 of 30 samples).
    settings, manifest, damaged, workers = plane
    run = "r-announce"
    plan = plan_epoch(manifest, run=run, epoch=0, features={"flow": FEATURES["flow"]}, length=L, height=SIZE,
                      width=SIZE, samples=6)
    job = next(j for j in plan.jobs if j.video not in damaged.values())
    topics = Topics(settings.topic_prefix)
    ensure_topics(settings, topics.run_topics(run, ["flow"], 0))
    store = SampleStore(settings, run)
    frames = np.zeros((L + 1, SIZE, SIZE, 3), np.uint8)
    assert store.put_frames(job.sample_id, frames, ["flow"]) == 1
    store.put_feature("flow", job.sample_id, np.full((2 * L, SIZE, SIZE), 7, np.uint8))  # the dead worker's write
    with SampleStream(settings, run, "flow") as stream:
        time.sleep(1.0)
        with MessageProducer(settings) as producer:  # the redelivered frames notice
            producer.publish(topics.frames(run, 0), FramesReady(jobs=[job]), key=job.sample_id)
        got = list(stream.epoch(0, 1, timeout_s=60))
    assert [s.sample_id for s in got] == [job.sample_id]
    assert int(got[0].array.max()) == 7  # the stored feature, not a new extraction


def test_pause_holds_a_run_and_resume_finishes_it(plane):
    settings, manifest, damaged, _ = plane
    run = "r-pause"
    publish_control(settings, "pause", run=run)
    plan = plan_epoch(manifest, run=run, epoch=0, features={"rgb": {}}, length=L, height=SIZE, width=SIZE,
                      samples=8)
    publish_plan(settings, plan)
    with SampleStream(settings, run, "rgb") as stream:
        time.sleep(6)
        assert stream._queue.qsize() == 0, "a paused run must not be decoded"
        publish_control(settings, "resume", run=run)
        got = list(stream.epoch(0, len(plan.jobs), timeout_s=60))
    assert len(got) + stream.stats.dead == len(plan.jobs)


def test_heartbeats_carry_counters_and_sigterm_stops_cleanly(plane):
    settings, manifest, damaged, workers = plane
    topics = Topics(settings.topic_prefix)
    seen: dict[str, WorkerEvent] = {}
    with MessageConsumer(settings, f"ev-{uuid.uuid4().hex[:6]}", [topics.events],
                         dead_letter_topic=topics.dead) as consumer:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not {ROLES["decode-b"], ROLES["flow-b"]} <= set(seen):
            for r in consumer.poll(1.0):
                if isinstance(r.message, WorkerEvent) and r.message.event == "heartbeat":
                    seen[r.message.worker_id] = r.message
        assert seen[ROLES["decode-b"]].counters["jobs_done"] > 0
        assert {"failures", "busy_s", "jobs_done"} <= set(seen[ROLES["flow-b"]].counters)
        # A stop command for one worker id: that worker, and only it, exits cleanly.
        publish_control(settings, "stop", target=ROLES["rgb-a"])
        assert workers["rgb-a"].wait(30) == 0
        assert workers["flow-b"].alive()
        # SIGTERM: a clean exit with a stopped event.
        assert workers["decode-b"].stop() == 0
        stopped = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not {ROLES["rgb-a"], ROLES["decode-b"]} <= stopped:
            stopped |= {r.message.worker_id for r in consumer.poll(1.0)
                        if isinstance(r.message, WorkerEvent) and r.message.event == "stopped"}
        assert {ROLES["rgb-a"], ROLES["decode-b"]} <= stopped


def test_a_long_run_keeps_a_few_epochs_of_topics_and_deleted_ones_stay_deleted(plane):
    # Per-epoch topics keep the broker's log the size of a few epochs: after epoch e the run has the
    # topics of epochs e-2 .. e+1 only, and no worker or consumer brings a deleted one back (Tansu
    # re-creates a topic a client names; kafka-python's producer names every topic it ever wrote to).
    from essp.dataplane.plan import run_topic_names

    settings, manifest, damaged, _ = plane
    run, topics = "r-epochs", Topics(settings.topic_prefix)
    good = manifest.model_copy(update={"videos": [v for v in manifest.videos if v.uri not in damaged.values()]})
    for epoch in range(6):
        plan, results, stats = run_epoch(settings, good, run, epoch=epoch, samples=8,
                                         features={"flow": FEATURES["flow"]})
        assert set(results["flow"]) == set(plan.sample_ids()) and stats["flow"].dead == 0
    time.sleep(4)  # past every client's metadata refresh: a topic named by someone would be back by now
    epochs = sorted({topics.epoch_of(t) for t in run_topic_names(settings, run)} - {None})
    assert epochs == [3, 4, 5, 6]
    assert topics.run_dead(run) in run_topic_names(settings, run)


def test_a_producer_forgets_the_partitions_of_deleted_topics(plane):
    # Its sender would otherwise ask for metadata in a loop once the topic is gone from the metadata
    # (the workers' CPU per sample tripled once old epochs were deleted).
    from essp.clients.kafka import delete_topics
    from essp.contract import SmokePing

    settings = plane[0]
    topic, other = f"{settings.topic_prefix}.gone", f"{settings.topic_prefix}.other"
    ensure_topics(settings, [topic, other])
    with MessageProducer(settings) as producer:
        producer.publish(topic, SmokePing(token="x"))
        delete_topics(settings, [topic])
        producer.publish(other, SmokePing(token="y"))
        metadata, accumulator = producer._producer._metadata, producer._producer._accumulator
        deadline = time.monotonic() + 15
        while topic in metadata.topics() and time.monotonic() < deadline:
            metadata.request_update()
            time.sleep(0.2)
        assert topic not in metadata.topics()
        _, _, unknown_leaders = accumulator.ready(metadata)
        assert not unknown_leaders and not any(tp.topic == topic for tp in accumulator._batches)
