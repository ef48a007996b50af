"""The resident trainer: one stream of one run, its model kept across epochs.

The master (Airflow, or :mod:`essp.lifecycle.pipeline`) asks for an epoch by writing ``{epoch, expected}`` under
the run's epoch-request key in Redis and publishing an ``epoch`` command on the control topic (which
only wakes the trainer sooner: a trainer started later still finds the request in Redis). The
trainer trains that epoch from its ``SampleStream``, writes a checkpoint to S3, records
``epoch_done`` in its Redis state and publishes an ``epoch_done`` event with the epoch's figures
(loss, accuracy, samples/s, data-wait fraction). The master waits on that state. On start it resumes
from the run's latest checkpoint of its stream; on SIGTERM or a ``stop`` command it checkpoints
where it is (mid-epoch checkpoints list the samples already trained on, which the resumed epoch
skips) and exits.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from essp.clients.kafka import ensure_topics
from essp.clients.redis import redis_client
from essp.contract import (
    TRAINER_FAMILY,
    TRAINER_STATE_TTL_S,
    ControlCommand,
    TrainerState,
    TrainerStatus,
    check_run_id,
)
from essp.dataplane.consumer import EpochStalled, SampleStream, StreamClosed
from essp.dataplane.resident import ResidentProcess
from essp.errors import EsspError, ServiceUnavailable
from essp.settings import Settings
from essp.training.artifacts import RunStore, check_pretrained
from essp.training.params import TrainParams
from essp.training.trainer import EpochStats, StreamTrainer
from essp.training.validation import ValidationSpec, publish_once

log = logging.getLogger("essp.train")


class TrainSpec(BaseModel):
    """What a trainer needs to know about its run and stream."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str
    stream: str
    num_classes: int = Field(ge=2)
    length: int = Field(ge=1, description="Stack length L of the run's samples.")
    params: TrainParams = Field(default_factory=TrainParams)
    prefetch: int | None = Field(None, ge=1)
    validation: ValidationSpec | None = None  # the snippets scored after each epoch; None: no validation


class TrainWorker(ResidentProcess):
    """See the module's doc; events, heartbeats, signals and control come from :class:`ResidentProcess`."""

    family: ClassVar[str] = TRAINER_FAMILY

    def __init__(self, settings: Settings, spec: TrainSpec, *, worker_id: str | None = None) -> None:
        check_run_id(spec.run)
        super().__init__(settings, worker_id=worker_id or f"train-{spec.stream}-{socket.gethostname()}-{os.getpid()}")
        self.kind = f"{TRAINER_FAMILY}-{spec.stream}"
        self.spec = spec
        self.runs = RunStore(settings, spec.run)
        self.wake = threading.Event()
        self.trainer: StreamTrainer | None = None
        self.source: SampleStream | None = None
        self.val_source: SampleStream | None = None
        self._attempt = ""
        self._state: TrainerState | None = None

    # -- state and events ---------------------------------------------------------------------------
    def _set_state(self, status: TrainerStatus, *, epoch_done: int | None = None, **extra: Any) -> None:
        assert self.trainer is not None
        if not self.leader:
            return
        done = self.trainer.epoch - 1 if epoch_done is None else epoch_done
        self._state = TrainerState(status=status, epoch_done=done, iteration=self.trainer.iteration,
                                   worker=self.worker_id, updated_at=time.time(), **extra)
        redis_client(self.settings).set(self.keys.trainer(self.spec.run, self.spec.stream),
                                        self._state.model_dump_json(), ex=TRAINER_STATE_TTL_S)

    def event_run(self) -> str | None:
        return self.spec.run

    def event_counters(self) -> dict[str, float]:
        trainer = self.trainer
        return {"epoch_done": float(self._state.epoch_done if self._state else -1),
                "iteration": float(trainer.iteration if trainer else 0)}

    def heartbeat_detail(self) -> str | None:
        return self._state.status if self._state else None

    def announces_ready(self) -> bool:
        return self.leader

    # -- control -------------------------------------------------------------------------------------
    def obey(self, command: ControlCommand) -> None:
        if command.run not in (None, self.spec.run):
            return
        if command.command == "stop":
            self.stop()
        elif command.command == "epoch":
            self.wake.set()
        elif command.run:
            self.control.forget(command.run)

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()
        # Under DDP every rank must run the same collectives: a rank never leaves an epoch alone;
        # the ranks agree to stop between epochs (see _agree).
        if self.source is not None and not self.distributed:
            self.source.interrupt()
        if self.val_source is not None:
            self.val_source.interrupt()

    # -- DDP -----------------------------------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        return self.trainer is not None and self.trainer.distributed

    @property
    def leader(self) -> bool:
        """The rank that records state, publishes events and writes checkpoints (rank 0)."""
        return self.trainer is None or self.trainer.rank == 0

    def _agree(self, request: tuple[int, int] | None) -> tuple[tuple[int, int] | None, bool]:
        """Every rank takes rank 0's epoch request, and stops when any rank is stopping."""
        import torch
        import torch.distributed as dist

        values = torch.tensor([request[0] if request else -1, request[1] if request else 0,
                               1 if self.stopping.is_set() else 0], dtype=torch.long)
        stop = values[2:].clone()
        dist.all_reduce(stop, op=dist.ReduceOp.MAX, group=self._control_group)
        dist.broadcast(values, src=0, group=self._control_group)
        agreed = None if int(values[0]) < 0 else (int(values[0]), int(values[1]))
        return agreed, bool(stop[0])

    # -- the loop ------------------------------------------------------------------------------------
    def _requested(self) -> tuple[int, int] | None:
        raw = redis_client(self.settings).get(self.keys.epoch_request(self.spec.run))
        if not raw:
            return None
        request = json.loads(raw)
        self._attempt = str(request.get("attempt", ""))  # which request for the epoch (validation publishes once)
        return int(request["epoch"]), int(request["expected"])

    def serve(self, *, install_signals: bool = True) -> dict[str, Any]:
        """Train requested epochs until stopped. Returns the last state."""
        spec = self.spec
        if spec.params.pretrained:  # verify_manifest checked it too; spec.json is read back from S3
            check_pretrained(spec.params.pretrained, self.settings)
        self.trainer = StreamTrainer(spec.stream, num_classes=spec.num_classes, length=spec.length,
                                     params=spec.params, settings=self.settings)
        self._control_group = None
        if self.distributed:
            import torch.distributed as dist

            self.worker_id = f"{self.worker_id}-rank{self.trainer.rank}"
            self._control_group = dist.new_group(backend="gloo")  # small CPU tensors, whatever the backend
        resumed = self.runs.latest_checkpoint_uri(spec.stream)
        if resumed:
            self.trainer.load_checkpoint(self.runs.load_checkpoint(resumed), source=resumed)
            log.info("resumed %s at epoch %d, iteration %d from %s", spec.stream, self.trainer.epoch,
                     self.trainer.iteration, resumed)
        # The stream reads its ready topics by pattern (one per epoch, created by the planner).
        ensure_topics(self.settings, [self.topics.control, self.topics.events, self.topics.run_dead(spec.run)])
        if self.leader:  # under DDP rank 0 reads the stream and hands each rank its slice
            self.source = SampleStream(self.settings, spec.run, spec.stream, prefetch=spec.prefetch)
            if spec.validation is not None:
                self.val_source = SampleStream(self.settings, spec.validation.data_run, spec.stream,
                                               prefetch=spec.prefetch)
        self._set_state("ready", resumed_from=resumed)
        self.start_resident(install_signals=install_signals,
                            detail=f"device {self.trainer.device}, resumed from {resumed or 'nothing'}")
        log.info("%s serving run %s stream %s on %s", self.worker_id, spec.run, spec.stream, self.trainer.device)
        try:
            while True:
                request = self._requested() if self.leader else None
                if self.distributed:
                    request, stop = self._agree(request)
                    if stop:
                        break
                elif self.stopping.is_set():
                    break
                if request is None or request[0] < self.trainer.epoch:
                    self.wake.wait(0.5)
                    self.wake.clear()
                    continue
                epoch, expected = request
                if epoch > self.trainer.epoch:
                    raise EsspError(f"run {spec.run}: epoch {epoch} requested, but stream {spec.stream} has trained "
                                    f"only up to epoch {self.trainer.epoch - 1}; request epoch {self.trainer.epoch}")
                self._train(epoch, expected)
        except Exception as exc:
            log.exception("trainer failed")
            self._set_state("failed", detail=f"{type(exc).__name__}: {exc}")
            self.event("error", detail=f"{type(exc).__name__}: {exc}")
            raise
        finally:
            self.stopping.set()
            for source in (self.source, self.val_source):
                if source is not None:
                    source.close()
            if self._state is None or self._state.status != "failed":
                self._set_state("stopped")
            self.stop_resident()
        return self._state.model_dump(mode="json") if self._state else {}

    def _train(self, epoch: int, expected: int) -> None:
        assert self.trainer is not None
        trainer, source, spec = self.trainer, self.source, self.spec
        self._set_state("training", epoch=epoch)
        skip = set(trainer.consumed)  # trained on before a mid-epoch stop: drained, not trained again
        samples = None
        if source is not None:
            delivered = source.epoch(epoch, expected, timeout_s=120.0,
                                     keep_waiting=lambda: self.control.get(spec.run) == "paused")
            samples = (s for s in delivered if s.sample_id not in skip)
        try:
            stats = trainer.train_epoch(samples, epoch=epoch,
                                        wait_s=(lambda: source.stats.waited_s) if source is not None else None,
                                        stop=None if self.distributed else self.stopping.is_set)
        except StreamClosed:
            stats = None
        except EpochStalled as exc:
            raise EsspError(str(exc)) from None
        finished = trainer.epoch == epoch + 1
        if not self.leader:
            return
        if finished and stats is not None and spec.validation is not None:
            self._validate(epoch, stats)
        uri = self._checkpoint(finished)
        if not finished:
            self._set_state("stopped", epoch=epoch, checkpoint=uri, detail="stopped mid-epoch")
            return
        assert stats is not None and source is not None
        stats.dead = source.stats.dead
        figures = stats.as_dict()
        log.info("%s epoch %d: loss %.4f accuracy %.3f %.1f samples/s data wait %.1f%%", spec.stream, epoch,
                 stats.loss, stats.accuracy, stats.samples_per_s, 100 * stats.data_wait)
        if stats.val_loss is not None:
            log.info("%s epoch %d: validation loss %.4f top-1 %.3f mean class accuracy %.3f (%d videos, %.1fs)",
                     spec.stream, epoch, stats.val_loss, stats.val_top1, stats.val_mean_class_accuracy,
                     stats.val_videos, stats.val_seconds)
        self._set_state("epoch_done", checkpoint=uri, stats=figures)
        self.event("epoch_done", epoch=epoch, counters={k: float(v) for k, v in figures.items()}, detail=uri)

    def _validate(self, epoch: int, stats: EpochStats) -> None:
        """Score the validation snippets of ``epoch`` (published by the first trainer to get here) and add the
        figures to ``stats`` and to the epoch's history entry, before the checkpoint is written."""
        assert self.trainer is not None and self.val_source is not None and self.spec.validation is not None
        # the epoch is not done (for the master, and for the other trainers' publish_once) until validated
        self._set_state("training", epoch=epoch, epoch_done=epoch - 1, detail="validating")
        plan, _ = publish_once(self.settings, self.spec.validation, epoch, self._attempt, self.spec.stream)
        delivered = self.val_source.epoch(epoch, len(plan.jobs), timeout_s=120.0,
                                          keep_waiting=lambda: self.control.get(self.spec.run) == "paused")
        try:
            figures = self.trainer.validate(delivered)
        except StreamClosed:
            log.warning("%s epoch %d: stopped while validating; the epoch is kept without validation figures",
                        self.spec.stream, epoch)
            return
        except EpochStalled as exc:
            raise EsspError(f"validation of epoch {epoch}: {exc}") from None
        self.trainer.record_validation(figures)
        for key in ("val_loss", "val_top1", "val_mean_class_accuracy", "val_videos", "val_seconds"):
            setattr(stats, key, figures[key])

    def _checkpoint(self, finished: bool) -> str:
        assert self.trainer is not None
        delay = 0.5
        while True:
            try:
                return self.runs.save_checkpoint(self.spec.stream, self.trainer.checkpoint(), finished_epoch=finished)
            except ServiceUnavailable as exc:  # S3 restarting: the checkpoint must not be lost
                log.warning("%s; retrying the checkpoint in %.1fs", exc, delay)
                time.sleep(delay)
                delay = min(2 * delay, 10.0)
