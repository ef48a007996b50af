"""The three-split protocol (issue 14): ingest records UCF-101's three train/test splits (split lists or the
group rule), each with its validation split; a run trains the split its `split` param names; the protocol report
is each split's figures and their mean."""

from __future__ import annotations

import pytest

from essp.datasets.ingest import ingest_directory
from essp.datasets.synth import synthesize
from essp.datasets.validation import video_group
from essp.evaluation.report import build_report, write_report
from essp.lifecycle.epochs import verify_manifest
from essp.lifecycle.params import RunParamsError, parse_params
from essp.lifecycle.protocol import protocol_report, split_run_id, train_splits
from essp.training.artifacts import RunStore


@pytest.fixture(scope="module")
def ucf_dir(tmp_path_factory):
    """Synthetic clips named like UCF-101's, 21 groups a class (1 clip each), and its three split lists."""
    root = synthesize(tmp_path_factory.mktemp("ucf") / "ds", classes=2, videos_per_class=3, frames=12, height=32,
                      width=32, keyint=4, seed=4).out_dir
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    source = {c: sorted((root / c).glob("*.mp4"))[0].read_bytes() for c in classes}
    for c in classes:  # groups 1..21: what UCF-101's splits divide (7 groups each as test)
        for old in (root / c).glob("*.mp4"):
            old.unlink()
        for g in range(1, 22):
            (root / c / f"v_{c}_g{g:02d}_c01.mp4").write_bytes(source[c])
    for stale in root.glob("*.txt"):
        stale.unlink()
    (root / "classInd.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes, 1)))
    for split, test_groups in ((1, range(1, 8)), (2, range(8, 15)), (3, range(15, 22))):
        lines = {"train": [], "test": []}
        for i, c in enumerate(classes, 1):
            for g in range(1, 22):
                which = "test" if g in test_groups else "train"
                lines[which].append(f"{c}/v_{c}_g{g:02d}_c01.mp4" + (f" {i}" if which == "train" else ""))
        (root / f"trainlist{split:02d}.txt").write_text("\n".join(lines["train"]) + "\n")
        (root / f"testlist{split:02d}.txt").write_text("\n".join(lines["test"]) + "\n")
    return root


def test_ingest_records_the_three_splits_each_with_its_validation_split(settings, ucf_dir):
    manifest, _ = ingest_directory(settings, ucf_dir, "ucf3")
    assert sorted(manifest.protocol) == ["1", "2", "3"] and manifest.ucf_split == 1
    assert manifest.protocol["1"] == manifest.splits
    for n, test_groups in (("1", range(1, 8)), ("2", range(8, 15)), ("3", range(15, 22))):
        split = manifest.protocol[n]
        assert {int(video_group(i).rsplit("g", 1)[1]) for i in split["test"]} == set(test_groups)
        groups = {name: {video_group(i) for i in ids} for name, ids in split.items()}
        assert not groups["val"] & groups["train"] and not groups["val"] & groups["test"] and groups["val"]
        assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 42
    # a re-ingest of the same folder is the same manifest (every split's validation videos kept)
    again, _ = ingest_directory(settings, ucf_dir, "ucf3")
    assert again.version == manifest.version


def test_a_run_trains_the_split_it_names_on_a_view_of_its_own(settings, ucf_dir):
    manifest, _ = ingest_directory(settings, ucf_dir, "ucf3")
    facts = verify_manifest(settings, parse_params({"dataset": "ucf3", "run": "split-2", "split": 2}))
    assert facts["split"] == 2 and facts["manifest_uri"] == RunStore(settings, "split-2").uri("manifest.json")
    assert (facts["train_videos"], facts["val_videos"], facts["test_videos"]) == tuple(
        len(manifest.protocol["2"][s]) for s in ("train", "val", "test"))
    # a manifest that never recorded split 3 says so, naming the param
    single = manifest.model_copy(update={"version": 0, "protocol": {}})
    from essp.datasets.manifest import ManifestStore

    ManifestStore(settings).save(single.model_copy(update={"name": "ucf1"}))
    with pytest.raises(RunParamsError, match="split: manifest ucf1@1 has no UCF split 3"):
        verify_manifest(settings, parse_params({"dataset": "ucf1", "run": "split-3", "split": 3}))


def _fake_report(settings, run: str, top1: float, streams: dict[str, float]) -> None:
    def metrics(value: float) -> dict:
        return {"top1": value, "top5": 1.0, "mean_class_accuracy": value, "mAP": value, "videos": 14,
                "per_class_accuracy": [value, value], "confusion": [[7, 0], [0, 7]]}

    evaluation = {"class_names": ["a", "b"], "streams": {s: metrics(v) for s, v in streams.items()},
                  "fusion": {"average": metrics(top1)}, "selected": "average"}
    write_report(settings, build_report(run, {}, {s: [] for s in streams}, evaluation))


def test_the_protocol_report_is_each_splits_figures_and_their_mean(settings):
    trained = []

    def train(settings, spec, log):  # what run_training leaves: a report per split
        trained.append((spec.run, spec.split))
        _fake_report(settings, spec.run, {1: 0.8, 2: 0.9, 3: 0.7}[spec.split], {"rgb": 0.6, "flow": 0.75})

    lines: list[str] = []
    report = train_splits(settings, parse_params({"run": "proto", "epochs": 1}), log=lines.append, train=train)
    assert trained == [("proto-s1", 1), ("proto-s2", 2), ("proto-s3", 3)] and split_run_id("proto", 2) == "proto-s2"
    assert report["mean"]["top1"]["mean"] == pytest.approx(0.8)
    assert report["mean"]["top1"]["std"] == pytest.approx((2 * 0.01 / 3) ** 0.5)
    assert report["streams_mean"]["flow"]["top1"]["mean"] == pytest.approx(0.75)
    assert RunStore(settings, "proto").load_json("protocol.json") == report
    assert any("mean over 3 split(s): top1 80.0%" in line for line in lines)
    assert protocol_report(settings, "proto", {2: "proto-s2"}, log=lines.append)["mean"]["top1"]["mean"] == 0.9
