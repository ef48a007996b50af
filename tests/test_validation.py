"""The validation split (issue 14): carved from the training groups only, stable, kept across refreshes and
runs; what a run does with it (spec.json, a manifest of its own for a pinned version); early stopping's and
the best checkpoint's rules over an epoch history."""

from __future__ import annotations

import numpy as np
import pytest

from essp.datasets.manifest import Manifest, ManifestStore, ManifestVideo
from essp.datasets.validation import carve_validation, needs_carving, video_group
from essp.errors import EsspError
from essp.lifecycle.epochs import verify_manifest
from essp.lifecycle.params import RunParamsError, parse_params
from essp.training.artifacts import RunStore
from essp.training.validation import ValidationTally, best_epoch, epochs_without_improvement


def video(class_name: str, label: int, group: int, clip: int) -> ManifestVideo:
    vid = f"{class_name}/v_{class_name}_g{group:02d}_c{clip:02d}"
    return ManifestVideo(id=vid, uri=f"s3://v/{vid}.avi", class_name=class_name, label=label, frames=40, fps=25,
                         width=64, height=64, codec="h264", keyframe_interval=12, size_bytes=1, sha256="0")


def ucf_like(groups: int = 10, clips: int = 3, test_groups: int = 3, name: str = "ucf") -> Manifest:
    classes = ["Archery", "Bowling", "Drumming"]
    videos = [video(c, label, g, k) for label, c in enumerate(classes) for g in range(1, groups + 1)
              for k in range(1, clips + 1)]
    test = sorted(v.id for v in videos if int(v.id.split("_g")[1][:2]) <= test_groups)
    train = sorted(v.id for v in videos if v.id not in set(test))
    return Manifest(name=name, source="/data", classes=classes, videos=videos, splits={"train": train, "test": test},
                    split_rule="UCF groups")


def groups(ids: list[str]) -> set[str]:
    return {video_group(i) for i in ids}


def test_the_validation_split_holds_whole_training_groups_and_no_test_video():
    base = ucf_like()
    carved = carve_validation(base, 0.2)
    train, val, test = (carved.splits[s] for s in ("train", "val", "test"))
    assert test == base.splits["test"]  # never touched
    assert sorted(train + val) == sorted(base.splits["train"])  # nothing lost, nothing added
    assert not groups(val) & groups(train) and not groups(val) & groups(test)  # no group in two splits
    for class_name in carved.classes:  # round(7 x 0.2) = 1 of each class's 7 training groups
        assert len({g for g in groups(val) if g.startswith(class_name + "/")}) == 1
        assert all(len([i for i in val if video_group(i) == g]) == 3 for g in groups(val))  # the whole group
    assert carved.val_fraction == 0.2 and carved.val_by_clip == []
    assert carved.split_rule == "UCF groups; validation: 0.2 of each class's training groups"
    assert carve_validation(base, 0.2) == carved  # the same videos give the same split
    assert not needs_carving(carved, None) and not needs_carving(carved, 0.2) and needs_carving(carved, 0.3)
    assert needs_carving(base, None)


def test_carving_again_keeps_the_groups_already_held_out():
    carved = carve_validation(ucf_like(), 0.2)
    more = carve_validation(carved, 0.4)  # round(7 x 0.4) = 3 groups a class now: the first one stays
    assert groups(carved.splits["val"]) < groups(more.splits["val"])
    back = carve_validation(more, 0.2)  # and back: the held-out ones come first, the extra ones return
    assert back.splits["val"] == carved.splits["val"] and sorted(back.splits["train"]) == sorted(carved.splits["train"])
    assert back.split_rule.count("validation:") == 1


def test_a_class_with_one_training_group_is_held_out_by_clip_and_says_so():
    base = ucf_like(groups=2, clips=4, test_groups=1)  # one training group of 4 clips a class
    carved = carve_validation(base, 0.25)
    assert carved.val_by_clip == carved.classes
    assert len(carved.splits["val"]) == 3 and len(carved.splits["train"]) == 9
    assert "by clip in 3 class(es) with one training group" in carved.split_rule
    assert not set(carved.splits["val"]) & set(carved.splits["test"])


@pytest.mark.parametrize("fraction", [0, -0.1, 0.51, 1.0])
def test_a_bad_fraction_is_refused_naming_it(fraction):
    with pytest.raises(EsspError, match="val_fraction"):
        carve_validation(ucf_like(), fraction)


def test_a_run_carves_its_validation_split_and_a_pinned_older_version_gets_a_copy_of_its_own(settings):
    store = ManifestStore(settings)
    store.save(ucf_like(name="valrun"))  # v1: no validation split (a manifest from before issue 14)
    facts = verify_manifest(settings, parse_params({"dataset": "valrun", "run": "val-a", "epochs": 1}))
    assert facts["manifest_uri"].endswith("/manifests/valrun/v0002.json")  # the next version, with val
    saved = store.load("valrun")
    assert saved.version == 2 and saved.val_fraction == 0.1 and facts["val_videos"] == len(saved.splits["val"]) > 0
    assert facts["train_videos"] == len(saved.splits["train"]) and facts["val_fraction"] == 0.1
    # the same fraction: the manifest is used as it is
    again = verify_manifest(settings, parse_params({"dataset": "valrun", "run": "val-b", "val_fraction": 0.1}))
    assert again["manifest_uri"] == facts["manifest_uri"] and store.latest_version("valrun") == 2
    # another fraction of a pinned older version: the run's own copy; the dataset's latest is not touched
    pinned = verify_manifest(settings, parse_params({"dataset": "valrun@1", "run": "val-c", "val_fraction": 0.3}))
    assert pinned["manifest_uri"] == RunStore(settings, "val-c").uri("manifest.json")
    assert store.latest_version("valrun") == 2 and store.load(pinned["manifest_uri"]).val_fraction == 0.3


def test_a_run_without_any_validation_video_is_refused_naming_the_manifest(settings):
    base = ucf_like(groups=2, clips=1, test_groups=1, name="noval")  # one clip of one training group a class
    ManifestStore(settings).save(base)
    with pytest.raises(RunParamsError, match=r"manifests/noval/v0002.json: no validation video"):
        verify_manifest(settings, parse_params({"dataset": "noval", "run": "val-d"}))


def test_the_figures_are_snippet_loss_and_video_level_accuracies():
    tally = ValidationTally(num_classes=2)
    # video 0 (label 0): one snippet wrong, two right -> the mean says class 0; video 1 (label 1): wrong
    probs = np.array([[0.4, 0.6], [0.9, 0.1], [0.8, 0.2], [0.7, 0.3]])
    tally.add(["v00000-s000", "v00000-s001", "v00000-s002", "v00001-s000"], [0, 0, 0, 1], probs,
              np.array([1.0, 0.1, 0.2, 1.2]))
    figures = tally.figures()
    assert figures["val_loss"] == pytest.approx(2.5 / 4) and figures["val_snippets"] == 4
    assert figures["val_top1"] == 0.5 and figures["val_mean_class_accuracy"] == 0.5 and figures["val_videos"] == 2


def test_best_epoch_and_patience_read_the_validation_loss():
    history = [{"epoch": 0, "val_loss": 1.0}, {"epoch": 1, "val_loss": 0.7}, {"epoch": 2, "val_loss": 0.8},
               {"epoch": 3, "val_loss": 0.7}]
    assert best_epoch(history)["epoch"] == 1  # the first of equals
    assert epochs_without_improvement(history) == 2
    assert best_epoch([{"epoch": 0, "loss": 1.0}]) is None and epochs_without_improvement([]) == 0


def _pointer(settings, run: str, stream: str, history: list[dict]) -> RunStore:
    """What a trainer's checkpoint pointer carries (essp.training.artifacts.RunStore.save_checkpoint)."""
    runs = RunStore(settings, run)
    runs.store.ensure_bucket(runs.bucket)
    runs.store.put_json(runs.bucket, f"{run}/checkpoints/{stream}/latest.json",
                        {"uri": runs.epoch_checkpoint_uri(stream, len(history) - 1), "epoch": len(history),
                         "iteration": 3 * len(history), "finished_epoch": True, "history": history})
    return runs


def test_early_stopping_waits_for_every_stream_to_stall_for_the_patience(settings):
    from essp.lifecycle.epochs import early_stop_after, early_stopped

    spec = parse_params({"run": "stop-a", "epochs": 10, "early_stop_patience": 2})
    _pointer(settings, "stop-a", "rgb", [{"epoch": e, "val_loss": v} for e, v in enumerate([1.0, 0.6, 0.7, 0.8])])
    _pointer(settings, "stop-a", "flow", [{"epoch": e, "val_loss": v} for e, v in enumerate([1.0, 0.9, 0.8, 0.9])])
    assert early_stop_after(settings, spec, 2) is None  # rgb: 1 epoch without improvement by epoch 2
    assert early_stop_after(settings, spec, 3) is None and early_stopped(settings, "stop-a") is None  # flow: 1
    _pointer(settings, "stop-a", "flow", [{"epoch": e, "val_loss": v}
                                           for e, v in enumerate([1.0, 0.9, 0.8, 0.9, 0.85])])
    _pointer(settings, "stop-a", "rgb", [{"epoch": e, "val_loss": v} for e, v in enumerate([1.0, 0.6, 0.7, 0.8, 0.9])])
    record = early_stop_after(settings, spec, 4)
    assert record["epoch"] == 4 and record["streams"] == {"rgb": {"best_epoch": 1, "best_val_loss": 0.6},
                                                          "flow": {"best_epoch": 2, "best_val_loss": 0.8}}
    assert "no stream's validation loss improved for 2 epoch(s)" in record["reason"]
    assert early_stopped(settings, "stop-a") == record
    off = spec.model_copy(update={"early_stop_patience": 0, "run": "stop-b"})
    _pointer(settings, "stop-b", "rgb", [{"epoch": e, "val_loss": 1.0} for e in range(6)])
    assert early_stop_after(settings, off, 5) is None


def test_the_best_checkpoint_is_the_epoch_of_lowest_validation_loss(settings):
    from essp.lifecycle.pipeline import scored_checkpoint

    runs = _pointer(settings, "best-a", "flow", [{"epoch": e, "val_loss": v} for e, v in enumerate([1.0, 0.4, 0.5])])
    best = parse_params({"run": "best-a", "score_checkpoint": "best"})
    assert scored_checkpoint(runs, best, "flow") == runs.uri("checkpoints/flow/epoch-0001.pt")
    assert scored_checkpoint(runs, best.model_copy(update={"score_checkpoint": "last"}), "flow") is None  # the latest
