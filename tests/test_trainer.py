"""The trainer: exact resume from checkpoints (epoch end and mid-epoch stop, also through S3), DDP on
two gloo processes with uneven sample counts, the schedule, data-wait accounting, bad params."""

from __future__ import annotations

import datetime
import gc
import os
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port_block
from pydantic import ValidationError

from essp.training.artifacts import CheckpointPointerError, RunStore
from essp.training.params import TrainParams
from essp.training.trainer import (
    StreamTrainer,
    TrainingError,
    checkpoint_bytes,
    checkpoint_from_bytes,
    lr_at,
)

L, SIZE, CLASSES = 2, 16, 3
PARAMS = TrainParams(arch="tiny", batch_size=4, lr=0.05, lr_steps=[5, 9], lr_gamma=0.5, seed=7, dropout=0.3)


@dataclass(frozen=True)
class FakeSample:
    sample_id: str
    label: int
    array: np.ndarray


def samples_for(epoch: int, count: int = 16, seed: int = 0) -> list[FakeSample]:
    """Flow-like stacks whose class is told by the mean of the x channels (learnable)."""
    rng = np.random.default_rng([seed, epoch])
    out = []
    for i in range(count):
        label = int(rng.integers(CLASSES))
        array = rng.integers(0, 60, size=(2 * L, SIZE, SIZE), dtype=np.uint8) + np.uint8(60 * label)
        out.append(FakeSample(f"e{epoch:04d}-{i:07d}", label, array))
    return out


def new_trainer(params: TrainParams = PARAMS) -> StreamTrainer:
    torch.set_num_threads(1)
    return StreamTrainer("flow", num_classes=CLASSES, length=L, params=params)


def state_of(trainer: StreamTrainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_at_an_epoch_end_gives_the_parameters_of_a_run_that_never_stopped():
    straight = new_trainer()
    for epoch in range(3):
        straight.train_epoch(samples_for(epoch))
    first = new_trainer()
    for epoch in range(2):
        first.train_epoch(samples_for(epoch))
    saved = checkpoint_from_bytes(checkpoint_bytes(first.checkpoint()), "test")
    torch.manual_seed(12345)  # the resumed process's own random state must not matter
    resumed = new_trainer()
    resumed.load_checkpoint(saved)
    assert (resumed.epoch, resumed.iteration) == (2, 8)
    resumed.train_epoch(samples_for(2))
    assert_same(state_of(straight), state_of(resumed))
    assert resumed.iteration == straight.iteration == 12
    assert resumed.current_lr() == straight.current_lr() == pytest.approx(0.05 * 0.25)
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2]
    # and the schedule is the step decay asked for
    assert lr_at(PARAMS, 4) == 0.05 and lr_at(PARAMS, 5) == 0.025 and lr_at(PARAMS, 12) == pytest.approx(0.0125)


def test_a_stop_mid_epoch_resumes_without_training_a_sample_twice():
    straight = new_trainer()
    straight.train_epoch(samples_for(0))
    straight.train_epoch(samples_for(1))

    stopping = new_trainer()
    stopping.train_epoch(samples_for(0))
    calls = {"n": 0}

    def stop_after_two_batches() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    stopping.train_epoch(samples_for(1), stop=stop_after_two_batches)
    assert stopping.epoch == 1 and len(stopping.consumed) == 8  # two batches of 4, epoch unfinished
    saved = checkpoint_from_bytes(checkpoint_bytes(stopping.checkpoint()), "test")
    resumed = new_trainer()
    resumed.load_checkpoint(saved)
    # The epoch is delivered again in full; what was trained on before the stop is skipped.
    skip = set(resumed.consumed)
    resumed.train_epoch([s for s in samples_for(1) if s.sample_id not in skip])
    assert resumed.epoch == 2 and resumed.consumed == []
    # Every weight is the same. BatchNorm's statistics are recomputed at the epoch end from the
    # batches the resumed process trained on (a stop checkpoint does not carry batches), so they
    # may differ from the uninterrupted run's: docs/training.md says so.
    params = lambda t: {k: v.detach().clone() for k, v in t.model.named_parameters()}  # noqa: E731
    assert_same(params(straight), params(resumed))


def test_checkpoints_round_trip_through_s3_and_mismatches_are_refused(settings):
    trainer = new_trainer()
    trainer.train_epoch(samples_for(0))
    runs = RunStore(settings, "resume-test")
    uri = runs.save_checkpoint("flow", trainer.checkpoint(), finished_epoch=True)
    assert uri.endswith("/checkpoints/flow/epoch-0000.pt")
    assert runs.latest_checkpoint_uri("flow") == uri
    again = new_trainer()
    again.load_checkpoint(runs.load_checkpoint(stream="flow"), source=uri)
    assert_same(state_of(trainer), state_of(again))
    other = StreamTrainer("flow", num_classes=CLASSES + 1, length=L, params=PARAMS)
    with pytest.raises(TrainingError, match="num_classes"):
        other.load_checkpoint(runs.load_checkpoint(uri))
    with pytest.raises(TrainingError, match="not a readable checkpoint"):
        checkpoint_from_bytes(b"not a checkpoint", "s3://x/y.pt")
    with pytest.raises(Exception, match="has no checkpoint yet"):
        runs.load_checkpoint(stream="rgb")

    # latest.json may only name one of the stream's own checkpoints in the run's bucket
    pointer = "resume-test/checkpoints/flow/latest.json"
    elsewhere = ["s3://another-bucket/resume-test/checkpoints/flow/epoch-0000.pt",
                 f"s3://{runs.bucket}/another-run/checkpoints/flow/epoch-0000.pt",
                 f"s3://{runs.bucket}/resume-test/checkpoints/flow/../../../another-run/model.pt",
                 f"s3://{runs.bucket}/resume-test/checkpoints/rgb/epoch-0000.pt", "/etc/passwd"]
    for bad in elsewhere:
        runs.store.put_json(runs.bucket, pointer, {"uri": bad, "epoch": 1, "iteration": 6, "finished_epoch": True})
        with pytest.raises(CheckpointPointerError, match="outside the stream's checkpoints"):
            runs.load_checkpoint(stream="flow")
    runs.store.put_json(runs.bucket, pointer, {"uri": uri, "epoch": 1, "iteration": 6, "finished_epoch": True})
    assert runs.latest_checkpoint_uri("flow") == uri


def test_training_learns_and_reports_its_figures():
    trainer = new_trainer(TrainParams(arch="tiny", batch_size=8, lr=0.05, seed=1))
    first = trainer.train_epoch(samples_for(0, 48))
    for epoch in range(1, 4):
        last = trainer.train_epoch(samples_for(epoch, 48))
    assert last.loss < first.loss
    assert last.accuracy > 1 / CLASSES
    assert last.samples == 48 and last.steps == 6 and last.samples_per_s > 0


def test_data_wait_is_the_time_spent_waiting_for_samples():
    def slow(samples):
        for sample in samples:
            time.sleep(0.02)
            yield sample

    trainer = new_trainer()
    stats = trainer.train_epoch(slow(samples_for(0, 12)))
    assert 0.24 * 0.9 <= stats.data_wait_s <= stats.seconds
    assert 0.2 < stats.data_wait <= 1.0


def test_an_epoch_without_samples_and_bad_params_are_refused():
    trainer = new_trainer()
    with pytest.raises(TrainingError, match="no sample to train on"):
        trainer.train_epoch([])
    with pytest.raises(TrainingError, match="next epoch is 0"):
        trainer.train_epoch(samples_for(1), epoch=1)
    with pytest.raises(ValidationError, match="lr_steps"):
        TrainParams(lr_steps=[10, 5])
    with pytest.raises(ValidationError, match="batch_size"):
        TrainParams(batch_size=1)
    with pytest.raises(TrainingError, match="CUDA"):
        if not torch.cuda.is_available():
            StreamTrainer("flow", num_classes=3, length=L, params=TrainParams(device="cuda"))
        else:
            raise TrainingError("CUDA present: nothing to refuse")


def _join_gloo(rank: int, world: int, port: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))


def _ddp_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    _join_gloo(rank, world, port)
    try:
        trainer = StreamTrainer("flow", num_classes=CLASSES, length=L, params=PARAMS)
        assert trainer.distributed and trainer.world_size == world
        initial = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        stats = []
        for epoch in range(2):
            # Rank 0 reads (27 samples: 3 steps of 2 x 4, then 3 samples, a slice of 1 for rank 1, which
            # sits the last step out under Join); rank 1 gets its slices from rank 0.
            stats.append(trainer.train_epoch(samples_for(epoch, 27) if rank == 0 else None).as_dict())
        torch.save({"state": trainer.model.state_dict(), "initial": initial, "stats": stats,
                    "iteration": trainer.iteration, "lr": trainer.current_lr(),
                    "momentum": [trainer.optimizer.state[p]["momentum_buffer"] for p in trainer.model.parameters()]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # Tear down in order: every rank done, the DDP model (its reducer) freed while the process group
        # lives, then the group. Left to the interpreter, the group's destructor can join a gloo thread that
        # waits for the GIL to free a finished work's tensors: both ranks hang (seen under load).
        dist.barrier()
        del trainer
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_ddp_on_two_gloo_processes_keeps_replicas_identical_with_uneven_shares(tmp_path):
    mp.start_processes(_ddp_rank, args=(2, free_port_block(1), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert_same(r0["state"], r1["state"])
    for a, b in zip(r0["momentum"], r1["momentum"], strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(r0["state"][k], r0["initial"][k]) for k in r0["state"])  # it trained
    assert r0["iteration"] == r1["iteration"] == 8  # 4 steps per epoch on rank 0, 3 on rank 1: the most
    assert r0["lr"] == r1["lr"] == pytest.approx(0.025)  # one decay, at iteration 5
    for s0, s1 in zip(r0["stats"], r1["stats"], strict=True):
        assert s0 == {**s1, "seconds": s0["seconds"], "samples_per_s": s0["samples_per_s"],
                      "data_wait_s": s0["data_wait_s"], "data_wait": s0["data_wait"]}
        assert s0["samples"] == 26  # every sample of the epoch but the one left alone in the last step
        assert s0["steps"] == 4


class _RunsCode:
    """An object whose unpickling would call a function: what a hostile checkpoint would carry."""

    def __reduce__(self):
        return (print, ("this ran while loading a checkpoint",))


def test_a_checkpoint_that_carries_code_is_refused(capsys):
    buffer = __import__("io").BytesIO()
    torch.save({"model": {}, "payload": _RunsCode()}, buffer)
    with pytest.raises(TrainingError, match="s3://b/evil.pt: not a readable checkpoint"):
        checkpoint_from_bytes(buffer.getvalue(), "s3://b/evil.pt")
    assert "this ran" not in capsys.readouterr().out


def _resized_rank(rank: int, world: int, port: int, out_dir: str) -> None:
    _join_gloo(rank, world, port)
    try:
        trainer = StreamTrainer("flow", num_classes=CLASSES, length=L, params=PARAMS)
        with open(os.path.join(out_dir, "one-process.pt"), "rb") as handle:
            saved = checkpoint_from_bytes(handle.read(), "test")
        trainer.load_checkpoint(saved)
        resumed = {"state": state_of(trainer), "epoch": trainer.epoch, "iteration": trainer.iteration,
                   "lr": trainer.current_lr(), "history": list(trainer.history),
                   "momentum": [trainer.optimizer.state[p]["momentum_buffer"].clone()
                                for p in trainer.model.parameters()]}
        stats = trainer.train_epoch(samples_for(2, 24) if rank == 0 else None).as_dict()
        torch.save({"resumed": resumed, "state": trainer.model.state_dict(), "stats": stats,
                    "iteration": trainer.iteration, "epochs": [h["epoch"] for h in trainer.history]},
                   os.path.join(out_dir, f"resized{rank}.pt"))
        dist.barrier()
        del trainer
        gc.collect()
    finally:
        dist.destroy_process_group()


def test_a_trainer_resumed_with_another_world_size_continues_from_its_checkpoint(tmp_path):
    # what essp.lifecycle.allocation does between epochs: a stream's trainer of one process stops after epoch 1,
    # and a trainer of two DDP processes resumes from its checkpoint
    straight = new_trainer()
    for epoch in range(2):
        straight.train_epoch(samples_for(epoch))
    (tmp_path / "one-process.pt").write_bytes(checkpoint_bytes(straight.checkpoint()))
    mp.start_processes(_resized_rank, args=(2, free_port_block(1), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"resized{r}.pt", weights_only=False) for r in (0, 1)]
    for rank in ranks:  # every rank starts where the run that never stopped was
        resumed = rank["resumed"]
        assert_same(resumed["state"], state_of(straight))
        for a, p in zip(resumed["momentum"], straight.model.parameters(), strict=True):
            assert torch.equal(a, straight.optimizer.state[p]["momentum_buffer"])
        assert (resumed["epoch"], resumed["iteration"]) == (2, 8) and resumed["lr"] == straight.current_lr()
        assert [h["epoch"] for h in resumed["history"]] == [0, 1]
    # and trains on as one: replicas identical, the schedule and the history continue (24 samples: 3 steps of 2 x 4)
    assert_same(ranks[0]["state"], ranks[1]["state"])
    assert any(not torch.equal(ranks[0]["state"][k], state_of(straight)[k]) for k in ranks[0]["state"])
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 8 + 3
    assert ranks[0]["epochs"] == [0, 1, 2] and ranks[0]["stats"]["samples"] == 24
