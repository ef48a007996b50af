"""Epoch planning: reproducible, balanced across classes, offsets that leave room for the stack."""

from __future__ import annotations

import math

import pytest

from essp.dataplane.plan import PlanError, parse_features, plan_epoch
from essp.datasets.manifest import Manifest, ManifestVideo

FEATURES = {"flow": {"method": "dis_fast"}}


def video(cls: str, label: int, i: int, frames: int) -> ManifestVideo:
    return ManifestVideo(
        id=f"{cls}/v_{cls}_g{i:02d}_c01", uri=f"s3://videos/{cls}/v_{cls}_g{i:02d}_c01.mp4", class_name=cls,
        label=label, frames=frames, fps=25.0, width=64, height=64, codec="h264", keyframe_interval=12,
        size_bytes=1000, sha256="0" * 64,
    )


def manifest(counts=(1, 5, 12), frames=40) -> Manifest:
    classes = [f"C{k}" for k in range(len(counts))]
    videos = [video(c, k, i, frames + i) for k, (c, n) in enumerate(zip(classes, counts, strict=True))
              for i in range(n)]
    return Manifest(name="m", version=1, created_at=0.0, source="test", classes=classes, videos=videos,
                    quarantined=[], splits={"train": [v.id for v in videos], "test": []})


def plan_dump(plan):
    return [job.model_dump(exclude={"sent_at"}) for job in plan.jobs]


def test_same_run_and_epoch_give_the_same_plan_and_others_differ():
    m = manifest()
    a = plan_epoch(m, run="run-1", epoch=3, features=FEATURES, samples=200)
    b = plan_epoch(m, run="run-1", epoch=3, features=FEATURES, samples=200)
    assert plan_dump(a) == plan_dump(b)
    assert plan_dump(a) != plan_dump(plan_epoch(m, run="run-1", epoch=4, features=FEATURES, samples=200))
    assert plan_dump(a) != plan_dump(plan_epoch(m, run="run-2", epoch=3, features=FEATURES, samples=200))
    # Manifest order does not matter: the draw sorts videos by id.
    shuffled = m.model_copy(update={"videos": list(reversed(m.videos))})
    assert plan_dump(plan_epoch(shuffled, run="run-1", epoch=3, features=FEATURES, samples=200)) == plan_dump(a)


def test_classes_are_balanced_even_when_video_counts_are_not():
    # 1, 5 and 12 videos: drawing the class first gives each a third of the samples. Pearson's
    # chi-square with 2 degrees of freedom stays under 13.82 (p = 0.001) for a uniform draw.
    n = 3000
    counts = plan_epoch(manifest(), run="bal", epoch=0, features=FEATURES, samples=n).class_counts()
    chi2 = sum((counts[k] - n / 3) ** 2 / (n / 3) for k in range(3))
    assert chi2 < 13.82, counts
    # ... and a draw that picked videos uniformly instead would fail this check.
    skewed = {0: n * 1 / 18, 1: n * 5 / 18, 2: n * 12 / 18}
    assert sum((skewed[k] - n / 3) ** 2 / (n / 3) for k in range(3)) > 13.82


def test_offsets_leave_room_for_the_stack_and_cover_the_video():
    m = manifest(counts=(1,), frames=20)
    plan = plan_epoch(m, run="off", epoch=0, features=FEATURES, length=10, samples=500)
    offsets = [job.offset for job in plan.jobs]
    assert min(offsets) == 0 and max(offsets) == 20 - 11  # every legal offset gets drawn
    assert all(job.offset + job.length + 1 <= job.video_frames for job in plan.jobs)
    assert len({job.sample_id for job in plan.jobs}) == 500
    assert math.isclose(sum(offsets) / len(offsets), 4.5, abs_tol=0.6)


def test_short_and_excluded_videos_are_skipped_and_bad_params_are_refused():
    m = manifest(counts=(2, 2), frames=8)  # frames 8 and 9
    plan = plan_epoch(m, run="s", epoch=0, features=FEATURES, length=8, samples=50)
    assert {job.video for job in plan.jobs} == {m.videos[1].uri, m.videos[3].uri}  # only the 9-frame ones
    excluded = plan_epoch(m, run="s", epoch=0, features=FEATURES, length=8, samples=50, exclude={m.videos[1].uri})
    assert {job.label for job in excluded.jobs} == {1}
    with pytest.raises(PlanError, match="no video has the 10 frames"):
        plan_epoch(m, run="s", epoch=0, features=FEATURES, length=9)
    with pytest.raises(PlanError, match="no split 'val'"):
        plan_epoch(m, run="s", epoch=0, features=FEATURES, split="val")
    with pytest.raises(PlanError, match="no features"):
        plan_epoch(m, run="s", epoch=0, features={})
    with pytest.raises(ValueError, match="run id"):
        plan_epoch(m, run="bad run", epoch=0, features=FEATURES)


def test_parse_features():
    assert parse_features("rgb, flow:method=tvl1:bound=15") == {"rgb": {}, "flow": {"method": "tvl1", "bound": 15}}
    with pytest.raises(PlanError, match="KEY=VALUE"):
        parse_features("flow:tvl1")
