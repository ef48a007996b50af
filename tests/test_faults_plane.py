"""Fault injection on the data plane's workers and services (docs/reliability.md): each test runs an
epoch on a private Redis and broker (tests/faultkit.py), injects one fault while it runs, and checks
the invariants (nothing lost, nothing duplicated past the consumer, bounds held, nothing left)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid

import pytest
from faultkit import FLOW, SIZE, Fleet, L, PrivateStack, assert_sound, every, run_epoch

from essp.clients.redis import redis_client
from essp.dataplane.consumer import SampleStream
from essp.dataplane.plan import plan_epoch, publish_plan
from essp.dataplane.resident import RunControl, publish_control
from essp.datasets.ingest import ingest_directory
from essp.datasets.synth import synthesize

pytestmark = [pytest.mark.slow, pytest.mark.fault]


@pytest.fixture(scope="module")
def faulty(base_settings, tmp_path_factory):
    """A private stack, a synthetic dataset on it, and 2 decode, 2 flow and 1 rgb worker."""
    stack = PrivateStack(base_settings, tmp_path_factory.mktemp("fault-stack"))
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, classes=3, videos_per_class=4, frames=24, height=48, width=48, keyint=6, seed=5)
    manifest, _ = ingest_directory(stack.settings, root, "faults")
    fleet = Fleet(stack.settings, tmp_path_factory.mktemp("fault-workers"))
    fleet.start("decode", "decode", "flow", "flow", "rgb")
    yield stack, manifest, fleet
    fleet.stop()
    stack.close()


def report(name: str, result) -> None:  # noqa: ANN001
    """The figures of the run, for docs/reliability.md (printed with -s, and in the junit output)."""
    for row in result.rows():
        print(f"FAULT {name}: {row} in {result.seconds:.1f}s, peak in flight {result.inflight_peak}/"
              f"{result.bound}, {result.commits_checked} commits checked, {result.remade} jobs remade")


def test_killing_a_random_worker_every_few_seconds_loses_nothing(faulty):
    stack, manifest, fleet = faulty
    killed: list[str] = []

    def kill_random(stop: threading.Event) -> None:
        def one() -> None:
            victims = fleet.of("decode") + fleet.of("flow") + fleet.of("rgb")
            victim = random.choice(victims)
            kind = "decode" if "decode" in victim.name else victim.name.split("-")[2]
            fleet.kill(victim)
            killed.append(victim.name)
            fleet.start(kind)  # the fleet keeps its size, as ensure_workers does

        every(1.5, one, stop, jitter=0.5)

    result = run_epoch(stack.settings, manifest, "kill-random", samples=240, during=kill_random, timeout_s=40,
                       consume_delay=0.04)
    report("kill-random", result)
    assert len(killed) >= 3, f"only {len(killed)} kills: the epoch ended too soon to test anything"
    assert_sound(result)
    assert sum(t.delivered for t in result.tallies.values()) == 2 * 240


def test_redis_restarted_empty_mid_epoch_loses_nothing(faulty):
    stack, manifest, fleet = faulty
    restarted = []

    def restart(stop: threading.Event) -> None:
        time.sleep(2.0)
        stack.restart("redis", down_s=3.0)  # longer than the ~1 s that used to end every worker
        restarted.append(time.monotonic())

    result = run_epoch(stack.settings, manifest, "redis-restart", samples=160, during=restart,
                       features=FLOW, consume_delay=0.03)
    report("redis-restart", result)
    assert restarted
    assert_sound(result)
    assert all(w.alive() for w in fleet.workers.values()), "a worker died of the Redis outage"
    # Lost frames are made again by the extractors, lost features by the consumer: either way, published
    # again to the decode topic.
    assert result.remade > 0, "the restart lost payloads: some samples must have been redone"


@pytest.mark.long
def test_a_paused_run_stays_paused_when_redis_restarts_empty(faulty):
    stack, manifest, fleet = faulty
    settings, run = stack.settings, "redis-paused"
    publish_control(settings, "pause", run=run)
    plan = plan_epoch(manifest, run=run, epoch=0, features=FLOW, length=L, height=SIZE, width=SIZE, samples=16)
    with SampleStream(settings, run, "flow", prefetch=2) as stream:
        time.sleep(1.0)
        publish_plan(settings, plan, chunk=4)
        time.sleep(3.0)  # the workers see the run paused and hold its jobs
        stack.restart("redis", down_s=2.0)
        time.sleep(5.0)  # past the workers' cache of the run's state: each reads it again
        assert RunControl(settings).get(run, fresh=True) == "paused", "the run became running again"
        got = []

        def drain() -> None:
            got.extend(s.sample_id for s in stream.epoch(0, len(plan.jobs), timeout_s=60))

        reader = threading.Thread(target=drain)
        reader.start()
        reader.join(4.0)
        assert not got, f"{len(got)} samples of the paused run were delivered after Redis restarted"
        publish_control(settings, "resume", run=run)
        reader.join(90)
    assert sorted(got) == sorted(plan.sample_ids())


@pytest.mark.long
def test_a_worker_stopped_past_its_lease_is_fenced_when_it_resumes(faulty):
    stack, manifest, fleet = faulty
    stopped = []

    def freeze(stop: threading.Event) -> None:
        time.sleep(1.5)
        victim = fleet.of("decode")[0]
        os.kill(victim.pid, signal.SIGSTOP)
        stopped.append(victim.name)
        try:  # past its lease (the session timeout), so the other decode worker takes its partitions
            time.sleep(stack.settings.kafka_session_timeout_ms / 1000 + 4)
        finally:
            os.kill(victim.pid, signal.SIGCONT)

    result = run_epoch(stack.settings, manifest, "sigstop", samples=200, during=freeze, features=FLOW,
                       consume_delay=0.06)
    report("sigstop", result)
    assert stopped
    assert_sound(result)
    # At-least-once: the frozen worker's uncommitted chunk is redone by its successor, and the chunk it was
    # in the middle of may be announced once more when it resumes; nothing beyond that.
    assert result.tallies["flow"].duplicates_dropped <= 3 * 8, result.rows()
    assert all(w.alive() for w in fleet.workers.values())


def _deny(stack, command: str, seconds: float) -> None:  # noqa: ANN001
    """Redis refuses ``command`` to ESSP for a while (an ACL change: NOPERM, a ResponseError the workers
    do not know), then allows it again."""
    client = redis_client(stack.settings)
    client.acl_setuser("default", enabled=True, reset_keys=False, commands=[f"-{command}"])
    try:
        time.sleep(seconds)
    finally:
        client.acl_setuser("default", enabled=True, reset_keys=False, commands=[f"+{command}"])


def test_an_unknown_redis_error_is_retried_then_dead_lettered_by_sample(faulty):
    stack, manifest, fleet = faulty
    denied = []

    def refuse_set(stop: threading.Event) -> None:
        time.sleep(1.5)
        denied.append(time.monotonic())
        _deny(stack, "set", 12.0)  # longer than a record's retries: its samples are given up, by name

    result = run_epoch(stack.settings, manifest, "unknown-error", samples=160, during=refuse_set, features=FLOW,
                       consume_delay=0.03)
    report("unknown-error", result)
    assert denied
    assert_sound(result)  # includes: every dead letter names its sample, run and epoch
    flow = result.tallies["flow"]
    assert flow.dead > 0, "nothing was given up: the fault did not hit a record"
    reasons = {letter.reason for letter in result.letters}
    assert all("no permissions" in r and "failed 3 times" in r for r in reasons), reasons


@pytest.mark.long
def test_a_brief_unknown_redis_error_is_ridden_out(faulty):
    stack, manifest, fleet = faulty

    def refuse_set(stop: threading.Event) -> None:
        time.sleep(1.5)
        _deny(stack, "set", 0.6)  # shorter than a record's retries (0.5 s, then 1 s)

    result = run_epoch(stack.settings, manifest, "brief-error", samples=120, during=refuse_set, features=FLOW,
                       consume_delay=0.03)
    report("brief-error", result)
    assert_sound(result)
    assert result.tallies["flow"].dead == 0, [letter.reason for letter in result.letters]


@pytest.mark.long
def test_an_extractor_error_dead_letters_that_sample_for_that_stream_only(faulty):
    stack, manifest, _ = faulty
    import fault_extractors  # noqa: F401 - registers "flaky" here (the planner checks the streams)

    settings = stack.scoped(extractor_modules="fault_extractors")
    fleet = Fleet(settings, stack.settings.state_dir / "flaky-workers")
    path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([os.path.dirname(__file__), path or ""])  # for the plugin
    try:
        fleet.start("decode", "flaky", "rgb")
    finally:  # only the workers started here need it
        if path is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = path
    try:
        result = run_epoch(settings, manifest, "flaky", samples=64, features={"rgb": {}, "flaky": {}})
    finally:
        fleet.stop()
    report("extractor-error", result)
    assert_sound(result)
    assert result.tallies["flaky"].dead > 0 and result.tallies["rgb"].dead == 0
    assert result.tallies["rgb"].delivered == 64
    for letter in result.letters:
        assert letter.stream == "flaky" and "extractor flaky failed" in letter.reason, letter.reason


@pytest.mark.long
def test_redis_at_its_memory_limit_is_back_pressure_not_a_stall(faulty):
    stack, manifest, fleet = faulty
    client = redis_client(stack.settings)
    # 96x96 samples (~120 KB of grey frames and flow each): room for about twelve above what Redis holds
    # now (plus 1 MB for its own buffers), while the bound lets 64 be in flight. The workers hit maxmemory
    # again and again and must wait (the decode) or write anyway (what frees memory), never drop or stall.
    size = 96
    sample_bytes = (L + 1) * size * size + 2 * L * size * size
    # The Redis ESSP starts has a limit of its own (there was none: it would have grown until the kernel
    # killed it); the test lowers it for the epoch.
    limit = int(client.config_get("maxmemory")["maxmemory"])
    assert limit == stack.settings.redis_maxmemory_mb * 1024 * 1024
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", used + 12 * sample_bytes + 1024 * 1024)
    try:
        result = run_epoch(stack.settings, manifest, "maxmemory", samples=120, features=FLOW, consume_delay=0.05,
                           max_inflight=64, timeout_s=60, size=size)
    finally:
        client.config_set("maxmemory", limit)
    report("maxmemory", result)
    assert_sound(result)
    assert result.tallies["flow"].dead == 0
    logs = "".join(w.log_path.read_text() for w in fleet.workers.values())
    assert "is full" in logs and "maxmemory" in logs, "the limit was never reached: nothing was tested"


@pytest.mark.long
def test_a_redis_too_full_to_take_a_chunk_stalls_with_the_reason(faulty):
    stack, manifest, fleet = faulty
    client = redis_client(stack.settings)
    limit = client.config_get("maxmemory")["maxmemory"]
    client.config_set("maxmemory", int(client.info("memory")["used_memory"]) + 64 * 1024)
    try:
        with pytest.raises(AssertionError, match=r"no sample for 20s.*Workers report: .*is full.*maxmemory"):
            run_epoch(stack.settings, manifest, "too-full", samples=40, features=FLOW, timeout_s=20, size=96)
    finally:
        client.config_set("maxmemory", limit)
        publish_control(stack.settings, "stop", run="too-full")  # its jobs are skipped, not left to run


@pytest.mark.long
def test_redis_that_stops_answering_for_longer_than_a_lease_loses_nothing(faulty):
    # DEBUG SLEEP's effect (Redis 7 refuses DEBUG unless enabled): the server stops answering for 8 s,
    # longer than every member's lease, which then all lapse at once.
    stack, manifest, fleet = faulty

    def freeze_redis(stop: threading.Event) -> None:
        time.sleep(2.0)
        pid = stack.redis_pid()
        os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(stack.settings.kafka_session_timeout_ms / 1000 + 2)
        finally:
            os.kill(pid, signal.SIGCONT)

    result = run_epoch(stack.settings, manifest, "slow-redis", samples=160, during=freeze_redis, features=FLOW,
                       consume_delay=0.04)
    report("slow-redis", result)
    assert_sound(result)
    assert all(w.alive() for w in fleet.workers.values())


def test_a_stream_paused_past_the_payload_ttl_still_gets_every_sample(faulty):
    # rgb far behind flow: its consumer stops for longer than the payload TTL, so its features expire
    # while flow has consumed the same samples. Each is redone for rgb alone.
    stack, manifest, _ = faulty
    settings = stack.scoped(payload_ttl_s=10)
    fleet = Fleet(settings, stack.settings.state_dir / "ttl-workers")
    fleet.start("decode", "flow", "rgb")
    taken = {"rgb": 0}

    def rgb_behind(stream: str) -> float:
        if stream != "rgb":
            return 0.0
        taken["rgb"] += 1
        return 14.0 if taken["rgb"] == 4 else 0.0  # one long stop, past the TTL

    try:
        result = run_epoch(settings, manifest, "ttl", samples=48, consume_delay=rgb_behind, max_inflight=64,
                           timeout_s=60)
    finally:
        fleet.stop()
    report("ttl", result)
    assert_sound(result)
    assert result.tallies["rgb"].redone > 0, "no rgb feature expired: the stop was too short to test anything"
    assert result.tallies["rgb"].dead == 0 and result.tallies["flow"].dead == 0


@pytest.mark.long
def test_the_broker_down_for_20_s_mid_epoch_loses_nothing(faulty):
    stack, manifest, fleet = faulty

    def restart_broker(stop: threading.Event) -> None:
        time.sleep(2.0)
        stack.restart("kafka", down_s=20.0)

    result = run_epoch(stack.settings, manifest, "broker-restart", samples=160, during=restart_broker,
                       features=FLOW, consume_delay=0.04)
    report("broker-restart", result)
    assert_sound(result)
    assert result.seconds > 20
    assert all(w.alive() for w in fleet.workers.values()), "a worker died of the broker's restart"


@pytest.mark.long
def test_poison_videos_that_crash_or_hang_the_decoder_are_quarantined(faulty):
    stack, manifest, _ = faulty
    train = manifest.split("train")
    crash, hang = train[1].uri, train[2].uri
    settings = stack.scoped(decode_timeout_s=3.0, kafka_session_timeout_ms=3000)
    fleet = Fleet(settings, stack.settings.state_dir / "poison-workers")
    os.environ["ESSP_FAILPOINTS"] = f"decode.crash={crash},decode.hang={hang}"
    restarts = []
    try:
        fleet.start("decode", "decode", "flow")

        def keep_two_decoders(stop: threading.Event) -> None:  # what a Deployment does for its pods
            while not stop.wait(0.3):
                if len(fleet.of("decode")) < 2:
                    restarts.append(time.monotonic())
                    fleet.start("decode")

        result = run_epoch(settings, manifest, "poison", samples=48, features=FLOW, during=keep_two_decoders,
                           timeout_s=90)
    finally:
        del os.environ["ESSP_FAILPOINTS"]
        fleet.stop()
    report("poison", result)
    assert_sound(result)
    poisoned = {job.sample_id for job in result.plan.jobs if job.video in (crash, hang)}
    videos = {job.sample_id: (job.video, job.offset) for job in result.plan.jobs}
    dead = {letter.sample_id for letter in result.letters}
    assert poisoned and dead == poisoned, ({i: videos[i] for i in poisoned - dead}, crash, hang)
    assert all("crashed or hung" in letter.reason for letter in result.letters), result.letters[0].reason
    quarantine = redis_client(settings).hgetall(f"{settings.redis_prefix}:poison:quarantine")
    assert {k.decode() for k in quarantine} == {crash, hang}
    assert 2 <= len(restarts) <= 2 * (3 + 1), f"{len(restarts)} restarts: the attempts are not bounded"


@pytest.mark.long
def test_every_decoder_killed_and_new_ones_30_s_later_the_epoch_completes(faulty):
    stack, manifest, fleet = faulty
    gap = []

    def kill_all_decoders(stop: threading.Event) -> None:
        time.sleep(2.0)
        victims = fleet.of("decode")
        for victim in victims:
            fleet.kill(victim)
        gap.append(time.monotonic())
        if not stop.wait(30.0):
            fleet.start(*["decode"] * len(victims))
            gap.append(time.monotonic())

    result = run_epoch(stack.settings, manifest, "kill-all", samples=160, during=kill_all_decoders, features=FLOW,
                       consume_delay=0.03, timeout_s=90)
    report("kill-all", result)
    assert len(gap) == 2 and gap[1] - gap[0] >= 30
    assert_sound(result)


@pytest.mark.long
def test_a_video_missing_for_a_moment_is_read_again_not_quarantined(faulty):
    # What an S3 server answers while it starts (its filer not loaded yet): "not found" for an object
    # that exists. The decode reads it again before it gives the video up.
    from essp.clients.s3 import ObjectStore, S3Uri

    stack, manifest, _ = faulty
    settings = stack.scoped(video_cache_mb=0)
    fleet = Fleet(settings, stack.settings.state_dir / "notfound-workers")
    store = ObjectStore(stack.settings)
    video = S3Uri.parse(manifest.split("train")[0].uri)
    data = store.get_bytes(video.bucket, video.key)
    fleet.start("decode", "flow")

    def gone_for_a_moment(stop: threading.Event) -> None:
        time.sleep(1.5)  # the workers have settled; the object comes back within the decode's re-reads
        store.put_bytes(video.bucket, video.key, data)

    try:
        store.delete(video.bucket, video.key)
        result = run_epoch(settings, manifest, "not-found", samples=48, features=FLOW, during=gone_for_a_moment)
    finally:
        store.put_bytes(video.bucket, video.key, data)
        logs = "".join(w.log_path.read_text() for w in fleet.workers.values())
        fleet.stop()
    assert "not found; reading it again" in logs, "no decode met the missing video: nothing was tested"
    report("not-found", result)
    assert_sound(result)
    assert result.tallies["flow"].dead == 0, [letter.reason for letter in result.letters]
    assert not redis_client(settings).hgetall(f"{settings.redis_prefix}:not-found:quarantine")
    assert any(job.video == str(video) for job in result.plan.jobs)


@pytest.mark.long
def test_a_bucket_missing_while_s3_starts_is_waited_for_not_quarantined(faulty):
    # What a starting S3 answers before its filer has loaded the buckets: "no such bucket". That is the
    # store not being there yet, not the videos being gone: the decode waits it out (an outage).
    from essp.clients.s3 import ObjectStore, S3Uri

    stack, manifest, fleet = faulty
    store = ObjectStore(stack.settings)
    late = f"{stack.settings.bucket_videos}-late"
    videos = [video.model_copy(update={"uri": str(S3Uri(late, S3Uri.parse(video.uri).key))})
              for video in manifest.videos]
    moved = manifest.model_copy(update={"videos": videos})

    def bucket_appears(stop: threading.Event) -> None:
        time.sleep(4.0)  # every decode worker has met the missing bucket by now
        store.ensure_bucket(late)
        for old, new in zip(manifest.videos, videos, strict=True):
            source, target = S3Uri.parse(old.uri), S3Uri.parse(new.uri)
            store.put_bytes(target.bucket, target.key, store.get_bytes(source.bucket, source.key))

    try:
        result = run_epoch(stack.settings, moved, "no-bucket", samples=48, features=FLOW, during=bucket_appears)
    finally:
        logs = "".join(w.log_path.read_text() for w in fleet.workers.values())
        if store.bucket_exists(late):
            store.delete_bucket(late)
    assert f"bucket {late} not found" in logs, "no decode met the missing bucket: nothing was tested"
    report("no-bucket", result)
    assert_sound(result)
    assert result.tallies["flow"].dead == 0, [letter.reason for letter in result.letters]
    assert not redis_client(stack.settings).hgetall(f"{stack.settings.redis_prefix}:no-bucket:quarantine")


@pytest.mark.long
def test_s3_refusing_the_decoders_credentials_dead_letters_each_sample_by_name(faulty):
    # 13d: an S3 error the decode does not know (403: the signature does not match, as after a rotated
    # key). Not an outage and not a missing video: each record is tried 3 times, then each of its samples
    # is dead-lettered by name (never one anonymous letter that leaves the slots taken), and the epoch ends.
    from pydantic import SecretStr

    stack, manifest, _ = faulty
    settings = stack.scoped(video_cache_mb=0, s3_secret_key=SecretStr("not-the-key-" + uuid.uuid4().hex))
    fleet = Fleet(settings, stack.settings.state_dir / "s3-403-workers")
    fleet.start("decode", "flow")
    try:
        result = run_epoch(settings, manifest, "s3-403", samples=24, features=FLOW)
    finally:
        fleet.stop()
    report("s3-403", result)
    assert_sound(result)  # delivered + dead == planned; every letter names its sample, run and epoch
    flow = result.tallies["flow"]
    assert flow.dead == flow.planned, "a sample got through S3 with a wrong key?"
    reasons = {letter.reason for letter in result.letters}
    assert all("failed 3 times" in r and "SignatureDoesNotMatch" in r for r in reasons), reasons
    assert not redis_client(settings).hgetall(f"{settings.redis_prefix}:s3-403:quarantine"), \
        "a refused request quarantined a good video"
