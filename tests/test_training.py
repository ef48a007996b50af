"""A two-stream training run end to end on the real services, small: a synthetic dataset ingested to
S3, resident decode / extractor / trainer processes (the flow and rgb trainers with DDP on two gloo
processes each), epochs planned to Kafka and trained from Redis, a stop and a resume, scoring of
every test and training video, every fusion side by side, the report and the registry in S3, and
prediction with the registered model."""

from __future__ import annotations

import json
import uuid

import pytest
from conftest import _cleanup

from essp.clients.s3 import ObjectStore, S3Uri
from essp.datasets.ingest import ingest_directory
from essp.datasets.manifest import ManifestStore
from essp.datasets.synth import synthesize
from essp.evaluation.report import read_report
from essp.lifecycle.model_registry import ModelRegistry
from essp.lifecycle.params import RunParamsError, parse_params
from essp.lifecycle.pipeline import run_training
from essp.lifecycle.predict import PredictionError, predict_videos
from essp.stack.services import isolated_settings
from essp.training.artifacts import RunStore

pytestmark = pytest.mark.slow

CLASSES = 3
PARAMS = {"rgb_arch": "tiny", "flow_arch": "tiny",
          "length": 4, "size": 32, "snippets": 5, "batch_size": 8, "lr": 0.05, "samples_per_epoch": 48,
          "trainer_procs": 2, "fusion": "weighted", "fusion_weights": {"rgb": 1.0, "flow": 2.0}, "registry": "e2e"}


@pytest.fixture(scope="module")
def trained(base_settings, tmp_path_factory):
    """Train 2 epochs, stop (the trainers exit), then ask for 5: the run resumes from its checkpoints."""
    settings = isolated_settings(base_settings, "t" + uuid.uuid4().hex[:10]).model_copy(update={"heartbeat_s": 1.0})
    root = tmp_path_factory.mktemp("synth")
    # 10 clips a class: 4 training groups (objects) per class. With 2 (6 clips) the RGB stream saw two
    # objects a class and scored at chance on the unseen test objects in about one run of three.
    synthesize(root, classes=CLASSES, videos_per_class=10, frames=24, height=48, width=48, keyint=6, seed=5)
    manifest, _ = ingest_directory(settings, root, "tiny")
    lines: list[str] = []
    spec = parse_params({**PARAMS, "run": "e2e-run", "dataset": "tiny", "epochs": 2})
    first = run_training(settings, spec, log=lines.append)
    spec = parse_params({**PARAMS, "run": "e2e-run", "dataset": "tiny", "epochs": 5})
    outcome = run_training(settings, spec, log=lines.append)
    yield settings, manifest, spec, first, outcome, lines, root
    _cleanup(settings)


def test_both_streams_learn_and_the_fusion_is_at_least_as_good(trained):
    settings, manifest, spec, first, outcome, lines, _ = trained
    report = read_report(settings, spec.run)
    chance = 1 / CLASSES
    streams = report["evaluation"]["streams"]
    assert set(streams) == {"rgb", "flow"}
    for name, metrics in streams.items():
        assert metrics["videos"] == len(manifest.split("test"))
        assert metrics["top1"] > chance, (name, metrics)
    best = max(m["top1"] for m in streams.values())
    assert report["selected"] == "weighted" and outcome["selected"] == "weighted"
    assert report["selected_metrics"]["top1"] >= best
    assert report["summary"]["fused_ge_best_stream"] is True
    # every strategy was scored side by side, the learned ones fitted on the validation videos only
    fusion = report["evaluation"]["fusion"]
    assert {"average", "weighted", "max", "product", "learned", "sequence"} <= set(fusion)
    assert all("skipped" not in fusion[s] for s in ("learned", "sequence"))
    runs = RunStore(settings, spec.run)
    assert runs.load_json("fusion/weighted.json")["strategy"] == "weighted"
    test_ids = set(runs.load_json("predictions/test.json")["video_ids"])
    fit = report["evaluation"]["fusion_fit"]
    used = ManifestStore(settings).load(runs.load_json("spec.json")["manifest_uri"])
    val_ids = {v.id for v in used.split("val")}
    assert fit["split"] == "val" and set(fit["strategies"]) == {"learned", "sequence"}
    assert set(fit["videos"]) == val_ids == set(runs.load_scores("val", "flow").video_ids)
    train_ids = {v.id for v in used.split("train")}
    assert val_ids and not val_ids & train_ids and not val_ids & test_ids
    assert test_ids == {v.id for v in manifest.split("test")}
    assert not ObjectStore(settings).exists(runs.bucket, f"{spec.run}/scores/train/flow.npz")  # never scored
    # the report's plots are in S3 next to its JSON
    store = ObjectStore(settings)
    for name in ("loss.png", "accuracy.png", "confusion.png", "per_class.png", "fusion.png"):
        location = S3Uri.parse(outcome["report"][name])
        assert store.get_bytes(location.bucket, location.key)[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_run_resumed_from_its_checkpoints_and_kept_the_history(trained):
    settings, manifest, spec, first, outcome, lines, _ = trained
    assert "  resuming after epoch 1" in lines
    report = read_report(settings, spec.run)
    for stream in ("rgb", "flow"):
        epochs = [h["epoch"] for h in report["history"][stream]]
        assert epochs == [0, 1, 2, 3, 4]
        history = report["history"][stream]
        assert history[-1]["loss"] < history[0]["loss"]
        assert all(0 <= h["data_wait"] <= 1 and h["samples"] >= 46 for h in history)
        # every epoch was validated: each validation video, all its snippets
        val_videos = len(ManifestStore(settings).load(RunStore(settings, spec.run).load_json("spec.json")
                                                      ["manifest_uri"]).split("val"))
        assert all(h["val_videos"] == val_videos and h["val_loss"] > 0 and 0 <= h["val_top1"] <= 1
                   and 0 <= h["val_mean_class_accuracy"] <= 1 for h in history), history
        state = RunStore(settings, spec.run).load_checkpoint(stream=stream)
        assert (state["epoch"], state["iteration"]) == (5, history[-1]["iteration"])
    epochs_lines = [line for line in lines if line.startswith("  epoch ")]
    assert len(epochs_lines) == 2 * 5  # each epoch trained once per stream, none twice
    assert all(" | val loss " in line for line in epochs_lines)
    # what a watcher reads without loading a checkpoint: each stream's figures in its checkpoint pointer,
    # and the scoring's progress per split (the UI's report tab, essp.orchestration.progress)
    from essp.lifecycle.progress import scoring_progress, stream_histories

    assert stream_histories(settings, spec.run, ["rgb", "flow"]) == report["history"]
    scoring = scoring_progress(settings, spec.run)
    assert {split: (p["scored"], p["total"], p["finished"]) for split, p in scoring.items()} == {
        split: (len(manifest.split(split)),) * 2 + (True,) for split in ("test", "val")}


def test_the_registry_promotes_only_a_better_model(trained):
    settings, _, spec, first, outcome, _, _ = trained
    registry = ModelRegistry(settings, "e2e")
    versions = registry.versions()
    assert [v.version for v in versions] == [1, 2]
    assert first["registry"]["promoted"] is True
    better = outcome["metrics"]["top1"] > first["metrics"]["top1"]
    assert outcome["registry"]["promoted"] is better
    production = registry.production()
    assert production is not None
    assert production.version == (2 if better else 1)
    assert set(production.streams) == {"rgb", "flow"}
    assert production.fusion["strategy"] == "weighted"


def test_predict_uses_the_production_model_and_names_bad_videos(trained):
    settings, manifest, spec, _, outcome, _, root = trained
    video = manifest.split("test")[0]
    location = S3Uri.parse(video.uri)
    data = ObjectStore(settings).get_bytes(location.bucket, location.key)
    result = predict_videos(settings, [("good.mp4", data), ("broken.mp4", b"\x00" * 2048)], registry="e2e", top=2)
    assert result["fusion"] == "weighted" and result["version"] == ModelRegistry(settings, "e2e").production().version
    good, broken = result["videos"]
    assert [c["class"] in manifest.classes for c in good["top"]] == [True, True]
    assert good["top"][0]["score"] >= good["top"][1]["score"]
    assert "broken.mp4" in broken["error"]
    override = predict_videos(settings, [("good.mp4", data)], registry="e2e", fusion="average", top=1)
    assert override["fusion"] == "average"
    with pytest.raises(PredictionError, match="fitted on the training videos"):
        predict_videos(settings, [("good.mp4", data)], registry="e2e", fusion="sequence")
    with pytest.raises(PredictionError, match="no production model"):
        predict_videos(settings, [("good.mp4", data)], registry="nothing-here")
    json.dumps(result)


def test_essp_predict_scores_a_folder_and_reports_each_bad_video(trained, tmp_path):
    """`essp predict DIR`: every video in the folder, the good ones scored, a corrupt, an empty and a
    truncated one each reported with its reason, exit code 2."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    settings, manifest, _, _, _, _, root = trained
    folder = tmp_path / "incoming"
    (folder / "more").mkdir(parents=True)
    good = sorted(root.rglob("*.mp4"))[:3]
    for i, path in enumerate(good):
        shutil.copy(path, folder / ("more" if i == 2 else ".") / f"good{i}.mp4")
    data = good[0].read_bytes()
    (folder / "corrupt.mp4").write_bytes(bytes(range(256)) * 20)
    (folder / "empty.avi").write_bytes(b"")
    (folder / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (folder / "notes.txt").write_text("not a video: not looked at")
    essp = str(Path(sys.executable).parent / "essp")
    done = subprocess.run([essp, "predict", str(folder), "--registry", "e2e", "--top", "2", "--json"],
                          env={**os.environ, **settings.as_env()}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stdout + done.stderr
    result = json.loads(done.stdout)
    videos = {Path(v["video"]).relative_to(folder).as_posix(): v for v in result["videos"]}
    assert sorted(videos) == ["corrupt.mp4", "empty.avi", "good0.mp4", "good1.mp4", "more/good2.mp4", "truncated.mp4"]
    for name in ("good0.mp4", "good1.mp4", "more/good2.mp4"):
        assert "error" not in videos[name]
        assert [c["class"] in manifest.classes for c in videos[name]["top"]] == [True, True]
    assert videos["corrupt.mp4"]["error"] == (f"video {folder / 'corrupt.mp4'}: not a video: no container format "
                                              "recognised (binary data, 5120 bytes; ESSP opens MP4/MOV, AVI, "
                                              "Matroska/WebM, MPEG-TS, MPEG-PS, MPEG video, FLV, ASF/WMV, Ogg, raw "
                                              "H.264, raw H.265)")
    assert videos["empty.avi"]["error"] == f"video {folder / 'empty.avi'}: empty file (0 bytes)"
    assert videos["truncated.mp4"]["error"].startswith(f"video {folder / 'truncated.mp4'}: truncated: ")
    wide = {**os.environ, **settings.as_env(), "COLUMNS": "400"}  # rich wraps at 80 columns without a terminal
    table = subprocess.run([essp, "predict", str(folder), "--registry", "e2e"], env=wide, capture_output=True,
                           text=True, timeout=600)
    assert table.returncode == 2 and "3 of 6 videos failed" in table.stdout, table.stdout + table.stderr
    missing = subprocess.run([essp, "predict", str(tmp_path / "nowhere")], env=wide, capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "no such file or folder" in missing.stderr


@pytest.mark.parametrize("values, named", [
    ({"fusion": "median"}, "fusion"),
    ({"fusion": "weighted"}, "fusion_weights"),
    ({"fusion_weights": {"rgb": 1.0}}, "missing"),
    ({"rgb_arch": "alexnet"}, "rgb_arch: 'alexnet' is not one of"),
    ({"streams": ["depth"]}, "not a registered extractor"),
    ({"flow_method": "lucas"}, "flow_method: 'lucas' is not one of"),
    ({"replicas": {"rgb": 0}}, "replicas.rgb: the run needs at least one rgb worker"),
    ({"samples_per_epoch": 0}, "samples_per_epoch"),
    ({"epochs": 0}, "epochs"),
    ({"lr_steps": [30, 10]}, "lr_steps"),
    ({"run": "bad run id"}, "run"),
    # values that would exhaust memory: the master's plan, the run's payloads in Redis
    ({"samples_per_epoch": 2_000_000}, "samples_per_epoch: Input should be less than or equal to 1000000"),
    ({"max_inflight": 5000}, "max_inflight: Input should be less than or equal to 4096"),
    ({"size": 1024, "length": 64}, r"max_inflight, size, length: 64 samples of 1024x1024, L=64, 2 stream\(s\) can "
                                   r"hold 28.2 GiB in Redis at once \(at most 8 GiB\)"),
    # one sample's stack (frames and float32 flow), and the data workers in all
    ({"size": 1024, "length": 25, "max_inflight": 1},
     r"size, length: one sample of 1024x1024, L=25 takes 278 MiB \(L\+1 frames in colour and 2L float32 flow planes; "
     r"at most 256 MiB\): lower size or length"),
    ({"replicas": {"decode": 256, "flow": 256, "rgb": 1}},
     r"replicas: 513 data workers in all \(decode 256, flow 256, rgb 1\), more than 512"),
])
def test_bad_params_are_refused_with_their_name(values, named):
    with pytest.raises(RunParamsError, match=named):
        parse_params({"run": "r1", "dataset": "tiny", **values})


def test_params_stored_by_the_first_version_still_load():
    # spec.json and registry versions written before the flat params: manifest, streams as a mapping
    old = {"run": "r0", "manifest": "tiny", "epochs": 3, "fusion": "average",
           "streams": {"rgb": {"arch": "tiny", "options": {}, "pretrained": None, "dropout": None},
                       "flow": {"arch": "resnet18", "options": {"method": "farneback"}, "pretrained": "s3://m/f.pt"}}}
    spec = parse_params(old)
    assert (spec.dataset, spec.streams, spec.rgb_arch, spec.flow_arch) == ("tiny", ["rgb", "flow"], "tiny", "resnet18")
    assert spec.features() == {"rgb": {}, "flow": {"method": "farneback"}}
    assert spec.stream("flow").pretrained == "s3://m/f.pt" and spec.train_params("rgb").arch == "tiny"


def test_a_model_of_other_classes_is_registered_but_never_promoted_automatically(settings):
    from essp.lifecycle.model_registry import ModelRegistry
    from essp.lifecycle.pipeline import register_model

    metrics = {"top1": 0.9, "top5": 1.0, "mean_class_accuracy": 0.9, "mAP": 0.95, "videos": 10}
    registry = ModelRegistry(settings, "classes-test")
    old = registry.register(run="old-run", streams={"rgb": "s3://b/old.pt"}, fusion={"strategy": "average"},
                            metrics={**metrics, "top1": 0.5}, class_names=["A", "B", "C"])
    registry.promote(old.version)
    spec = parse_params({"run": "new-run", "dataset": "other", "streams": ["rgb"], "registry": "classes-test"})
    runs = RunStore(settings, spec.run)
    runs.save_json("spec.json", {"spec": spec.model_dump(mode="json"), "manifest_uri": "s3://b/m.json",
                                 "dataset": "other", "classes": ["A", "B", "D"]})
    runs.store.put_json(settings.bucket_runs, f"{spec.run}/checkpoints/rgb/latest.json",
                        {"uri": f"s3://{settings.bucket_runs}/{spec.run}/checkpoints/rgb/epoch-0000.pt", "epoch": 1,
                         "iteration": 1, "finished_epoch": True})
    result = register_model(settings, spec, metrics, fusion_state="s3://b/f.json", log=lambda _: None)
    assert result["version"] == 2 and result["promoted"] is False
    assert "other classes" in result["reason"]
    assert registry.production().version == 1  # a better top1 over other classes does not compare


def _pids_of(marker: str) -> list[int]:
    import os

    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if marker.encode() in handle.read():
                        pids.append(int(entry))
            except OSError:
                continue
    return pids


def test_a_trainer_that_dies_mid_run_fails_the_run_with_its_log_and_stops_the_rest(settings, tmp_path):
    import os
    import signal
    import threading
    import time

    from essp.deploy.local import LocalProcesses
    from essp.errors import EsspError
    from essp.lifecycle.epochs import trainer_states

    synthesize(tmp_path / "data", classes=2, videos_per_class=4, frames=16, height=32, width=32, keyint=4, seed=1)
    ingest_directory(settings, tmp_path / "data", "killme")
    spec = parse_params({"run": "kill-run", "dataset": "killme", "epochs": 50, "rgb_arch": "tiny",
                         "flow_arch": "tiny", "length": 2, "size": 32, "batch_size": 4, "samples_per_epoch": 8,
                         "snippets": 2})
    killed: list[int] = []

    def kill_after_first_epoch() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            state = trainer_states(settings, spec.run, ["flow"])["flow"]
            if state is not None and state.epoch_done >= 0:
                for pid in _pids_of(f"trainer-{spec.run}-flow"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_after_first_epoch)
    killer.start()
    started = time.monotonic()
    with pytest.raises(EsspError, match=r"worker trainer-kill-run-flow exited with -9 during epoch \d+"):
        run_training(settings, spec, log=lambda _: None)
    killer.join()
    assert killed and time.monotonic() - started < 120  # noticed at once, not after epoch_timeout_s
    assert _pids_of("trainer-kill-run-") == []  # every other worker of the run was stopped
    assert LocalProcesses(settings).names("worker-") == []  # and the data workers it started


def test_the_steps_run_as_stages_with_small_json(trained):
    from essp.errors import EsspError
    from essp.orchestration.stages import run_stage, stage_names

    settings, _, spec, _, outcome, _, _ = trained
    assert {"verify-manifest", "train-epoch", "score-test", "score-val", "fuse-and-report", "register-model"} <= set(
        stage_names())
    fused = run_stage("fuse-and-report", settings, {"run": spec.run})
    assert fused["selected"] == "weighted" and fused["metrics"]["top1"] == outcome["metrics"]["top1"]
    assert fused["report"].endswith("/report/report.json") and len(json.dumps(fused)) < 4096
    before = len(ModelRegistry(settings, "e2e").versions())
    registered = run_stage("register-model", settings, {"run": spec.run, "fused": fused})
    assert registered["version"] == before + 1 and registered["promoted"] is False  # not better than itself
    from essp.lifecycle.progress import registration

    recorded = registration(settings, spec.run)  # what the report's first card says
    assert {k: recorded[k] for k in ("registry", "version", "promoted", "reason")} == \
        {k: registered[k] for k in ("registry", "version", "promoted", "reason")}
    assert recorded["metric"] == spec.promote_metric
    with pytest.raises(EsspError, match="stage verify-manifest: spec: fusion: 'median' is not one of"):
        run_stage("verify-manifest", settings, {"spec": {"run": "x1", "dataset": "tiny", "fusion": "median"}})
    with pytest.raises(Exception, match="epoch"):
        run_stage("train-epoch", settings, {"run": spec.run, "epoch": -1})
    with pytest.raises(Exception, match="run: Field required"):
        run_stage("score-test", settings, {})
