"""Trainer slots moved between streams by validation loss (issue 14, the paper's §3.4): the policy, its record
in S3, and a real run whose trainers restart with other world sizes between epochs and train on."""

from __future__ import annotations

import uuid

import pytest
from conftest import _cleanup

from essp.datasets.ingest import ingest_directory
from essp.datasets.synth import synthesize
from essp.errors import EsspError
from essp.evaluation.report import read_report
from essp.lifecycle import allocation
from essp.lifecycle.allocation import apply_allocation, current_slots, decide, improvement_rate
from essp.lifecycle.params import RunParamsError, parse_params
from essp.lifecycle.pipeline import run_training
from essp.stack.services import isolated_settings
from essp.training.artifacts import RunStore


def losses(*values: float) -> list[dict]:
    return [{"epoch": e, "val_loss": v} for e, v in enumerate(values)]


def test_a_converged_stream_gives_its_slots_to_the_one_still_improving():
    # both still improving over the window (2 spare slots: 1.2 and 0.8, the remainder to flow): nothing moves
    histories = {"rgb": losses(1.0, 0.5, 0.499), "flow": losses(1.2, 1.0, 0.8)}
    slots, reason, rates = decide(histories, {"rgb": 2, "flow": 2}, total=4, minimum=1)
    assert slots == {"rgb": 2, "flow": 2} and "(as before)" in reason
    assert rates["rgb"] == pytest.approx((1.0 - 0.499) / 1.0 / 2)  # over the window of two epochs: 25%/epoch
    assert "converged" not in reason and rates["flow"] == pytest.approx((1.2 - 0.8) / 1.2 / 2)
    # a plateau over the whole window is convergence
    histories = {"rgb": losses(1.0, 0.5, 0.5, 0.499), "flow": losses(1.2, 1.0, 0.8, 0.6)}
    slots, reason, rates = decide(histories, {"rgb": 2, "flow": 2}, total=4, minimum=1)
    assert slots == {"rgb": 1, "flow": 3} and "converged: rgb" in reason and rates["rgb"] < 0.01
    # both improving: the shares of the 4 spare slots in proportion to their rates (0.30 and 0.10 an epoch: 3 and
    # 1) are 4 and 2; from 2 and 4 a decision moves one slot towards them, and again two epochs later
    histories = {"rgb": losses(1.0, 0.7, 0.4), "flow": losses(1.0, 0.9, 0.8)}
    slots, reason, _ = decide(histories, {"rgb": 2, "flow": 4}, total=6, minimum=1)
    assert slots == {"rgb": 3, "flow": 3} and reason.endswith("towards rgb 4, flow 2")
    assert decide(histories, slots, total=6, minimum=1, since_move=1)[0] == slots  # cooling down
    assert decide(histories, slots, total=6, minimum=1, since_move=2)[0] == {"rgb": 4, "flow": 2}


def test_nothing_moves_without_two_validated_epochs_or_any_improvement_or_with_the_static_policy():
    current = {"rgb": 2, "flow": 2}
    assert decide({"rgb": losses(1.0), "flow": losses(1.0, 0.5)}, current, total=4)[0] == current
    assert decide({"rgb": losses(1.0, 1.1), "flow": losses(1.0, 1.0)}, current, total=4)[0] == current
    assert decide({"rgb": losses(1.0, 0.1), "flow": losses(1.0, 1.0)}, current, total=4, policy="static")[0] == current
    assert improvement_rate(losses(1.0, 1.5)) == 0.0 and improvement_rate([]) is None
    with pytest.raises(EsspError, match="exceed the run's 3 slots"):
        decide({}, current, total=3, minimum=2)


@pytest.mark.parametrize("values, named", [
    ({"allocation": "greedy"}, "allocation"),
    ({"allocation": "validation_loss", "trainer_procs": 1}, "no slot to move"),
    ({"allocation_min": 3, "trainer_procs": 2}, "allocation_min"),
])
def test_bad_allocation_params_are_refused_naming_them(values, named):
    with pytest.raises(RunParamsError, match=named):
        parse_params(values)


def test_each_decision_is_recorded_once_with_its_reason_and_applied(settings):
    spec = parse_params({"run": "alloc-a", "trainer_procs": 2, "allocation": "validation_loss", "epochs": 5})
    runs = RunStore(settings, "alloc-a")
    for stream, history in (("rgb", losses(1.0, 0.5, 0.5, 0.5)), ("flow", losses(1.2, 1.0, 0.8, 0.6))):
        # what a trainer's checkpoint pointer carries (essp.training.artifacts.RunStore.save_checkpoint)
        runs.store.ensure_bucket(runs.bucket)
        runs.store.put_json(runs.bucket, f"alloc-a/checkpoints/{stream}/latest.json",
                            {"uri": runs.epoch_checkpoint_uri(stream, 3), "epoch": 4, "iteration": 9,
                             "finished_epoch": True, "history": history})
    resized, lines = [], []
    decided = apply_allocation(settings, spec, 4, log=lines.append, resize=lambda s, n: resized.append((s, n)))
    assert decided["slots"] == {"rgb": 1, "flow": 3} and decided["moved"] and decided["after_epoch"] == 3
    assert resized == [("rgb", 1), ("flow", 3)] and current_slots(settings, spec) == {"rgb": 1, "flow": 3}
    assert any("converged: rgb" in line for line in lines)
    # a retried planner applies the same decision again, it does not decide again
    again: list = []
    assert apply_allocation(settings, spec, 4, log=lines.append, resize=lambda s, n: again.append((s, n))) == decided
    assert again == resized
    record = runs.load_json(allocation.ALLOCATION_FILE)
    assert record["policy"] == "validation_loss" and record["total"] == 4 and len(record["decisions"]) == 1
    static = spec.model_copy(update={"allocation": "static"})
    assert apply_allocation(settings, static, 4, resize=lambda s, n: pytest.fail("static moved a slot")) is None


def test_a_run_moves_slots_between_epochs_and_the_resized_trainers_train_on(base_settings, tmp_path, monkeypatch):
    """The policy is forced (the real one is tested above): after epoch 0, rgb's trainer goes from 2 DDP processes to
    1 and flow's to 3; both restart from their checkpoints, and epoch 1 runs with those world sizes."""
    settings = isolated_settings(base_settings, "al" + uuid.uuid4().hex[:10]).model_copy(update={"heartbeat_s": 1.0})
    synthesize(tmp_path / "data", classes=2, videos_per_class=6, frames=16, height=32, width=32, keyint=4, seed=2)
    ingest_directory(settings, tmp_path / "data", "alloc")

    def forced(histories, current, **_):
        return {"rgb": 1, "flow": 3}, "forced by the test", {s: None for s in current}

    monkeypatch.setattr(allocation, "decide", forced)
    spec = parse_params({"run": "alloc-run", "dataset": "alloc", "rgb_arch": "tiny", "flow_arch": "tiny", "length": 3,
                         "size": 32, "snippets": 2, "val_snippets": 2, "batch_size": 4, "samples_per_epoch": 24,
                         "epochs": 2, "trainer_procs": 2, "allocation": "validation_loss", "fusion": "average"})
    lines: list[str] = []
    try:
        run_training(settings, spec, log=lines.append)
        history = read_report(settings, "alloc-run")["history"]
        # 24 samples, batches of 4 per process: 3 steps at 2 processes, 6 at 1, 2 at 3
        assert [h["steps"] for h in history["rgb"]] == [3, 6]
        assert [h["steps"] for h in history["flow"]] == [3, 2]
        assert all(h["val_loss"] is not None for hs in history.values() for h in hs)
        assert "  allocation before epoch 1: forced by the test" in lines
        record = RunStore(settings, "alloc-run").load_json(allocation.ALLOCATION_FILE)
        assert [d["slots"] for d in record["decisions"]] == [{"rgb": 1, "flow": 3}]
    finally:
        _cleanup(settings)
