"""Fault injection on the object store (docs/reliability.md): an S3 server of the test's own goes away
for 30 s mid-epoch and comes back (answering "not found" while it starts); no good video may be
quarantined, and nothing may be lost."""

from __future__ import annotations

import threading
import time

import pytest
from faultkit import FLOW, Fleet, PrivateStack, assert_sound, run_epoch

from essp.clients.redis import redis_client
from essp.datasets.ingest import ingest_directory
from essp.datasets.synth import synthesize

pytestmark = [pytest.mark.slow, pytest.mark.fault, pytest.mark.long]


def test_s3_away_for_30_s_quarantines_no_good_video(base_settings, tmp_path_factory):
    stack = PrivateStack(base_settings, tmp_path_factory.mktemp("s3-stack"), s3=True)
    try:
        root = tmp_path_factory.mktemp("synth")
        synthesize(root, classes=3, videos_per_class=4, frames=24, height=48, width=48, keyint=6, seed=7)
        manifest, _ = ingest_directory(stack.settings, root, "s3faults")
        # No cache of video bytes: every sample reads its video from S3, so the outage reaches the decode.
        settings = stack.settings.model_copy(update={"video_cache_mb": 0})
        fleet = Fleet(settings, tmp_path_factory.mktemp("s3-workers"))
        fleet.start("decode", "decode", "flow")
        outage = []

        def s3_away(stop: threading.Event) -> None:
            time.sleep(2.0)
            stack.stop("s3")
            outage.append(time.monotonic())
            time.sleep(30.0)
            stack.start("s3")
            outage.append(time.monotonic())

        try:
            result = run_epoch(settings, manifest, "s3-away", samples=120, features=FLOW, during=s3_away,
                               consume_delay=0.05, timeout_s=120)
            alive = all(w.alive() for w in fleet.workers.values())
        finally:
            fleet.stop()
        print(f"FAULT s3-away: {result.rows()} in {result.seconds:.1f}s")
        assert len(outage) == 2
        assert_sound(result)
        assert result.tallies["flow"].dead == 0, [letter.reason for letter in result.letters]
        assert not redis_client(settings).hgetall(f"{settings.redis_prefix}:s3-away:quarantine")
        assert alive
    finally:
        stack.close()
