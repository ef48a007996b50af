"""Training one stream: the step, the epoch, checkpoints that resume exactly, and DDP.

:class:`StreamTrainer` owns one stream's model, optimizer and learning-rate schedule. It trains on
any iterable of :class:`~essp.dataplane.consumer.Sample` (the data plane's prefetching ``SampleStream`` in
production, a list in tests), batching samples as they arrive. A checkpoint holds the model, the
optimizer, the scheduler, the epoch, the iteration, the parameters, the per-epoch history and the
random state, so a run resumed from it continues exactly as the run that never stopped would (given
the same samples in the same order: the data plane delivers in arrival order, see docs/training.md).

On a GPU the step runs in bf16 autocast with channels-last tensors; on a CPU in fp32. With several
processes (``torch.distributed`` initialised: one per GPU, or gloo processes on CPUs) the model is
wrapped in ``DistributedDataParallel``. Rank 0 alone reads the stream: for each step it gathers
``batch_size x world_size`` samples and broadcasts them, and each rank trains on its slice. Ranks
that each read their own share would deadlock as soon as one waits for data while the others wait
for it in the gradient all-reduce; with one reader every rank is in every step. The last step of an
epoch may leave a rank fewer than two samples (BatchNorm needs two): that rank sits it out under
``Join``, and at the end of the epoch every rank takes the model and optimizer state of the rank
that ran the most steps, so replicas are identical.
"""

from __future__ import annotations

import io
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from essp.errors import EsspError
from essp.training.models import build_model, normalise_batch, stream_channels
from essp.training.params import TrainParams

log = logging.getLogger("essp.training.trainer")

CHECKPOINT_FORMAT = 1
FINITE_CHECK_STEPS = 25  # how often the epoch reads its loss back from the device to check it


class TrainingError(EsspError):
    """Training cannot start or go on (bad parameters, a checkpoint that does not fit, no data)."""


@dataclass
class EpochStats:
    """What one epoch of one stream did (summed over DDP ranks)."""

    epoch: int
    samples: int = 0
    steps: int = 0
    loss: float = 0.0  # mean over samples
    accuracy: float = 0.0  # training accuracy over samples
    seconds: float = 0.0
    samples_per_s: float = 0.0
    data_wait_s: float = 0.0
    data_wait: float = 0.0  # fraction of the epoch's time spent waiting for samples
    lr: float = 0.0
    iteration: int = 0
    dead: int = 0
    # validation after the epoch (essp.training.validation); None: not validated
    val_loss: float | None = None
    val_top1: float | None = None
    val_mean_class_accuracy: float | None = None
    val_videos: int = 0
    val_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass
class _Clock:
    """Time the training loop spent blocked on the data source."""

    waited_s: float = 0.0
    started: float = field(default_factory=time.monotonic)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device {name!r} asked for, but torch sees no CUDA device")
    return device


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class StreamTrainer:
    """One stream's model, optimizer and schedule; see the module's doc."""

    def __init__(self, stream: str, *, num_classes: int, length: int, params: TrainParams,
                 settings: Any = None) -> None:
        self.stream = stream
        self.num_classes = num_classes
        self.length = length
        self.params = params
        self.in_channels = stream_channels(stream, length)
        self.distributed = _is_distributed()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        device = resolve_device(params.device)
        if self.distributed and device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.rank % torch.cuda.device_count())
        self.device = device
        cuda = device.type == "cuda"
        self.amp = cuda if params.amp is None else params.amp
        self.channels_last = cuda if params.channels_last is None else params.channels_last
        torch.manual_seed(params.seed)  # identical initial weights on every rank and every rerun
        model = build_model(params.arch, stream, num_classes=num_classes, length=length, dropout=params.dropout,
                            pretrained=params.pretrained, settings=settings)
        model = model.to(device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.net: nn.Module = model
        if self.distributed:
            self.net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        self.optimizer = torch.optim.SGD(model.parameters(), lr=params.lr, momentum=params.momentum,
                                         weight_decay=params.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=params.lr_steps,
                                                              gamma=params.lr_gamma)
        self.loss_fn = nn.CrossEntropyLoss()
        self.epoch = 0  # the next epoch to train
        self.iteration = 0
        self.history: list[dict[str, float]] = []
        # A checkpoint taken mid-epoch (on stop) lists the samples already trained on, so the
        # resumed epoch is planned without them.
        self.consumed: list[str] = []

    # -- one step -----------------------------------------------------------------------------------
    def _batch_tensor(self, arrays: list[np.ndarray]) -> torch.Tensor:
        batch = torch.from_numpy(np.stack(arrays))
        if self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        return normalise_batch(self.stream, batch)

    def _autocast(self):  # noqa: ANN202
        if self.amp:
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def step(self, arrays: list[np.ndarray], labels: list[int]) -> torch.Tensor:
        """One optimisation step on one batch; returns [summed loss, correct predictions] as a tensor
        on the device: reading them back would make the host wait for the GPU at every step, so the
        epoch sums them there and reads them every FINITE_CHECK_STEPS steps."""
        inputs = self._batch_tensor(arrays)
        targets = torch.as_tensor(labels, dtype=torch.long, device=self.device)
        with self._autocast():
            logits = self.net(inputs)
            loss = self.loss_fn(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.iteration += 1
        return torch.stack([loss.detach().double() * len(labels), (logits.argmax(1) == targets).sum().double()])

    def _check_finite(self, totals: torch.Tensor) -> None:
        if not bool(torch.isfinite(totals[0])):
            raise TrainingError(f"stream {self.stream}: the loss is not finite by iteration {self.iteration} "
                                f"(lr {self.current_lr():g}); lower the learning rate")

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- one epoch ----------------------------------------------------------------------------------
    def _batches(self, samples: Iterable[Any],
                 clock: _Clock) -> Iterator[tuple[list[np.ndarray], list[int], list[str]]]:
        arrays: list[np.ndarray] = []
        labels: list[int] = []
        ids: list[str] = []
        source = iter(samples)
        while True:
            asked = time.monotonic()
            sample = next(source, None)
            clock.waited_s += time.monotonic() - asked
            if sample is None:
                break
            arrays.append(sample.array)
            labels.append(int(sample.label))
            ids.append(sample.sample_id)
            if len(arrays) == self.params.batch_size:
                yield arrays, labels, ids
                arrays, labels, ids = [], [], []
        # BatchNorm needs two values per channel: a last batch of one sample is dropped (it is
        # counted as consumed, not trained on).
        if len(arrays) > 1:
            yield arrays, labels, ids
        elif ids:
            self.consumed.extend(ids)

    def train_epoch(self, samples: Iterable[Any] | None, *, epoch: int | None = None,
                    wait_s: Any = None, stop: Any = None) -> EpochStats:
        """Train on every sample the iterable yields, as one epoch (under DDP only rank 0 reads
        ``samples``; the other ranks pass None).

        ``wait_s``: a callable giving the data source's own blocked time (a ``SampleStream``'s
        ``stats.waited_s``), used instead of timing ``next()`` when given. ``stop``: a callable; when
        it returns true the epoch ends early and the trainer is left mid-epoch (see
        :meth:`checkpoint`)."""
        epoch = self.epoch if epoch is None else epoch
        if epoch != self.epoch:
            raise TrainingError(f"stream {self.stream}: asked to train epoch {epoch}, but the next epoch is "
                                f"{self.epoch} (checkpoint iteration {self.iteration})")
        self.net.train()
        clock = _Clock()
        source_wait0 = wait_s() if wait_s else 0.0
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed loss, correct
        count, steps = 0, 0
        stopped = False
        recent: deque[list[np.ndarray]] = deque(maxlen=self.params.precise_bn_batches or 1)
        batches = self._shared_batches(samples, clock) if self.distributed else self._batches(samples, clock)
        with self._join():
            for arrays, labels, ids in batches:
                recent.append(arrays)
                totals += self.step(arrays, labels)
                count += len(labels)
                steps += 1
                if steps % FINITE_CHECK_STEPS == 0:
                    self._check_finite(totals)
                self.consumed.extend(ids)
                if stop is not None and stop():
                    stopped = True
                    break
        self._check_finite(totals)
        loss_sum, correct = (float(x) for x in totals.tolist())
        if not stopped and self.params.precise_bn_batches:
            self.recompute_batchnorm(list(recent))
        seconds = time.monotonic() - clock.started
        waited = (wait_s() - source_wait0) if wait_s else clock.waited_s
        if self.distributed:
            loss_sum, correct, count, steps, seconds, waited = self._reduce_epoch(
                loss_sum, correct, count, steps, seconds, waited)
        if count == 0 and not stopped:
            raise TrainingError(f"stream {self.stream}, epoch {epoch}: no sample to train on (every sample of "
                                "the epoch was lost or dead-lettered; see the run's dead-letter topic)")
        stats = EpochStats(epoch=epoch, samples=count, steps=steps, loss=loss_sum / max(count, 1),
                           accuracy=correct / max(count, 1), seconds=seconds,
                           samples_per_s=count / seconds if seconds > 0 else 0.0, data_wait_s=waited,
                           data_wait=min(1.0, waited / seconds) if seconds > 0 else 0.0, lr=self.current_lr(),
                           iteration=self.iteration)
        if not stopped:
            self.epoch = epoch + 1
            self.consumed = []
            self.history.append(stats.as_dict())
        return stats

    @torch.no_grad()
    def validate(self, samples: Iterable[Any]) -> dict[str, Any]:
        """Score validation snippets (``Sample``s with ids ``v<video>-s<snippet>``) with the model in eval mode:
        the validation loss over snippets and the video-level top-1 and mean class accuracy (see
        essp.training.validation). Draws no random numbers, so a resumed run stays exact."""
        from essp.training.validation import ValidationTally

        tally = ValidationTally(self.num_classes)
        started = time.monotonic()
        was_training = self.model.training
        self.model.eval()

        def run(arrays: list[np.ndarray], labels: list[int], ids: list[str]) -> None:
            with self._autocast():
                logits = self.model(self._batch_tensor(arrays)).float()
            targets = torch.as_tensor(labels, dtype=torch.long, device=self.device)
            losses = nn.functional.cross_entropy(logits, targets, reduction="none")
            tally.add(ids, labels, torch.softmax(logits, dim=1).cpu().numpy(), losses.cpu().numpy())

        try:
            arrays: list[np.ndarray] = []
            labels: list[int] = []
            ids: list[str] = []
            for sample in samples:
                arrays.append(sample.array)
                labels.append(int(sample.label))
                ids.append(sample.sample_id)
                if len(arrays) == self.params.batch_size:
                    run(arrays, labels, ids)
                    arrays, labels, ids = [], [], []
            if arrays:
                run(arrays, labels, ids)
        finally:
            self.model.train(was_training)
        return {**tally.figures(), "val_seconds": time.monotonic() - started}

    def record_validation(self, figures: dict[str, Any]) -> None:
        """Add the last finished epoch's validation figures to its history entry (checkpointed with it)."""
        if self.history and int(self.history[-1]["epoch"]) == self.epoch - 1:
            self.history[-1].update({k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()})

    @torch.no_grad()
    def recompute_batchnorm(self, batches: list[list[np.ndarray]]) -> None:
        """Precise BatchNorm statistics: the running averages are what the weights of many steps ago
        produced, blended with their initial values, which after a short run (a few dozen steps)
        makes the model in eval mode disagree with itself in training mode. Recompute them as the
        plain average over recent batches with the final weights (dropout off, no gradient, no
        random numbers drawn: resuming stays exact)."""
        norms = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms or not batches:
            return
        momenta = [m.momentum for m in norms]
        was_training = self.model.training
        self.model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # cumulative average
            norm.train()
        try:
            with self._autocast():
                for arrays in batches:
                    self.model(self._batch_tensor(arrays))
        finally:
            for norm, momentum in zip(norms, momenta, strict=True):
                norm.momentum = momentum
            self.model.train(was_training)

    # -- DDP ------------------------------------------------------------------------------------------
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def _shared_batches(self, samples: Iterable[Any] | None,
                        clock: _Clock) -> Iterator[tuple[list[np.ndarray], list[int], list[str]]]:
        """Rank 0 reads ``batch_size x world_size`` samples per step and broadcasts them; every rank
        yields its own slice. Other ranks pass ``samples=None``."""
        per_step = self.params.batch_size * self.world_size
        source = iter(samples) if self.rank == 0 and samples is not None else None
        device = self._comm_device()
        while True:
            arrays: list[np.ndarray] = []
            labels: list[int] = []
            ids: list[str] = []
            last = 0
            if source is not None:
                while len(arrays) < per_step:
                    asked = time.monotonic()
                    sample = next(source, None)
                    clock.waited_s += time.monotonic() - asked
                    if sample is None:
                        last = 1
                        break
                    arrays.append(sample.array)
                    labels.append(int(sample.label))
                    ids.append(sample.sample_id)
            shape = list(arrays[0].shape) if arrays else [0, 0, 0]
            header = torch.tensor([len(arrays), *shape, last], dtype=torch.long, device=device)
            dist.broadcast(header, src=0)
            n, channels, height, width, last = (int(x) for x in header.tolist())
            if n:
                if self.rank == 0:
                    data = torch.from_numpy(np.stack(arrays)).to(device)
                    targets = torch.tensor(labels, dtype=torch.long, device=device)
                else:
                    data = torch.empty((n, channels, height, width), dtype=torch.uint8, device=device)
                    targets = torch.empty(n, dtype=torch.long, device=device)
                dist.broadcast(data, src=0)
                dist.broadcast(targets, src=0)
                bounds = np.linspace(0, n, self.world_size + 1).round().astype(int)
                lo, hi = int(bounds[self.rank]), int(bounds[self.rank + 1])
                if self.rank == 0:
                    self.consumed.extend(ids)
                if hi - lo > 1:  # BatchNorm needs two samples; a smaller slice sits the step out (Join)
                    mine = data[lo:hi].cpu().numpy()
                    yield list(mine), targets[lo:hi].cpu().tolist(), []
                elif not last:
                    raise TrainingError(f"rank {self.rank}: a slice of {hi - lo} sample(s) before the last step")
            if last or not n:
                return

    def _join(self):  # noqa: ANN202
        if not self.distributed:
            return nullcontext()
        from torch.distributed.algorithms.join import Join

        return Join([self.net])

    def _reduce_epoch(self, loss_sum: float, correct: float, count: int, steps: int, seconds: float,
                      waited: float) -> tuple[float, int, int, int, float, float]:
        device = self._comm_device()
        sums = torch.tensor([loss_sum, correct, count], dtype=torch.float64, device=device)
        dist.all_reduce(sums)
        # The rank that ran the most steps holds the full optimizer history: everyone takes its state.
        ranks_steps = torch.tensor([self.iteration, self.rank], dtype=torch.long, device=device)
        gathered = [torch.zeros_like(ranks_steps) for _ in range(self.world_size)]
        dist.all_gather(gathered, ranks_steps)
        source = max(gathered, key=lambda t: (int(t[0]), -int(t[1])))
        self._sync_from(int(source[1]))
        self.iteration = int(source[0])
        self.scheduler.last_epoch = self.iteration
        # waited: the reader's (rank 0), the others wait in the broadcast instead
        longest = torch.tensor([seconds, steps, waited], dtype=torch.float64, device=device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        return (float(sums[0]), int(sums[1]), int(sums[2]), int(longest[1]), float(longest[0]), float(longest[2]))

    def _sync_from(self, source: int) -> None:
        """Broadcast parameters, buffers, optimizer state and learning rates from rank ``source``."""
        for tensor in list(self.model.parameters()) + list(self.model.buffers()):
            dist.broadcast(tensor.data, src=source)
        device = self._comm_device()
        for group in self.optimizer.param_groups:
            lr = torch.tensor([group["lr"]], dtype=torch.float64, device=device)
            dist.broadcast(lr, src=source)
            group["lr"] = float(lr)
            for param in group["params"]:
                state = self.optimizer.state[param]
                has = torch.tensor([1 if state.get("momentum_buffer") is not None else 0], device=device)
                dist.broadcast(has, src=source)
                if int(has):
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(param.data)
                    dist.broadcast(state["momentum_buffer"], src=source)

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        """Everything to continue exactly: model, optimizer, scheduler, epoch, iteration, params,
        history, the samples of an unfinished epoch, and the random state."""
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": CHECKPOINT_FORMAT, "stream": self.stream, "arch": self.params.arch,
            "num_classes": self.num_classes, "length": self.length, "in_channels": self.in_channels,
            "params": self.params.model_dump(), "epoch": self.epoch, "iteration": self.iteration,
            "consumed": list(self.consumed), "history": list(self.history),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "rng": rng,
        }

    def load_checkpoint(self, state: dict[str, Any], *, source: str = "checkpoint") -> None:
        if state.get("format") != CHECKPOINT_FORMAT:
            raise TrainingError(f"{source}: checkpoint format {state.get('format')!r} is not {CHECKPOINT_FORMAT}")
        for key, mine in (("stream", self.stream), ("arch", self.params.arch), ("num_classes", self.num_classes),
                          ("length", self.length)):
            if state.get(key) != mine:
                raise TrainingError(f"{source}: checkpoint has {key}={state.get(key)!r}, this trainer {mine!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.iteration = int(state["iteration"])
        self.consumed = list(state.get("consumed", []))
        self.history = list(state.get("history", []))
        rng = state.get("rng") or {}
        if "torch" in rng:
            torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def checkpoint_from_bytes(data: bytes, source: str) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint from S3 is data (tensors and plain values), never code to run.
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file gets the same clear error
        raise TrainingError(f"{source}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise TrainingError(f"{source}: not an ESSP checkpoint (no 'model' entry)")
    return state


def lr_at(params: TrainParams, iteration: int) -> float:
    """The learning rate the schedule gives at ``iteration`` (step decays at ``lr_steps``)."""
    passed = sum(1 for s in params.lr_steps if s <= iteration)
    return params.lr * math.pow(params.lr_gamma, passed)
