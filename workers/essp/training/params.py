"""The params of a training run (:class:`RunSpec`), checked with errors that name each param.

Light on purpose (no torch): the DAG files, the trigger form's validation and every stage that only
reads a run's spec import it; :mod:`essp.lifecycle.pipeline` re-exports it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from essp.contract import check_run_id
from essp.dataplane.extractors import create_extractor, extractor_kinds
from essp.errors import EsspError

if TYPE_CHECKING:
    from essp.training.trainer import TrainParams

# The networks essp.training.models builds, by name.
ARCHITECTURES = ("tiny", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg16", "vgg19")
# Snippets scored per video (the paper's 25, evenly spaced).
DEFAULT_SNIPPETS = 25


class RunSpecError(EsspError, ValueError):
    """A training run's parameters are not valid; the message names the parameter."""


class StreamSpec(BaseModel):
    """One stream of a run: its architecture and its extractor's options (e.g. the flow method)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str = "tiny"
    options: dict[str, Any] = Field(default_factory=dict)
    pretrained: str | None = None
    dropout: float | None = Field(None, ge=0, lt=1)


class RunSpec(BaseModel):
    """Every knob of a training run (the `essp_train` DAG's params)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run: str
    manifest: str = Field(description="Dataset manifest: a name (latest version), name@N, or an s3:// URI.")
    streams: dict[str, StreamSpec] = Field(
        default_factory=lambda: {"rgb": StreamSpec(), "flow": StreamSpec(options={"method": "dis_fast"})})
    epochs: int = Field(6, ge=1, le=10_000)
    samples_per_epoch: int | None = Field(None, ge=1, description="Default: the number of training videos.")
    length: int = Field(10, ge=1, le=64, description="Stack length L.")
    size: int = Field(112, ge=16, le=1024, description="Samples are size x size pixels.")
    batch_size: int = Field(16, ge=2, le=4096)
    lr: float = Field(0.01, gt=0, le=10)
    lr_steps: list[int] = Field(default_factory=list)
    lr_gamma: float = Field(0.1, gt=0, le=1)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    seed: int = Field(0, ge=0)
    device: str = "auto"
    snippets: int = Field(DEFAULT_SNIPPETS, ge=1, le=250, description="Snippets scored per test video.")
    fusion: Literal["average", "weighted", "max", "product", "learned", "sequence"] = "average"
    fusion_weights: dict[str, float] | None = None
    registry: str | None = Field(None, description="Model registry name; default: the dataset's name.")
    promote_metric: Literal["top1", "top5", "mean_class_accuracy", "mAP"] = "top1"
    trainer_procs: int = Field(1, ge=1, le=64, description="DDP processes per stream trainer (one per GPU).")
    max_inflight: int = Field(64, ge=1)
    epoch_timeout_s: float = Field(1800, gt=0, description="How long to wait for one epoch of every stream.")

    @field_validator("run")
    @classmethod
    def _run_id(cls, run: str) -> str:
        return check_run_id(run)

    @model_validator(mode="after")
    def _checks(self) -> RunSpec:
        if not self.streams:
            raise ValueError("streams: name at least one stream (rgb, flow, framediff)")
        for name, stream in self.streams.items():
            if name not in extractor_kinds():
                raise ValueError(f"streams: {name!r} is not a registered extractor ({', '.join(extractor_kinds())})")
            if stream.arch not in ARCHITECTURES:
                raise ValueError(f"streams.{name}.arch: {stream.arch!r} is not one of {', '.join(ARCHITECTURES)}")
            try:
                create_extractor(name, stream.options)
            except (ValueError, EsspError) as exc:
                raise ValueError(f"streams.{name}.options: {exc}") from None
        if self.fusion == "weighted" and not self.fusion_weights:
            raise ValueError("fusion_weights: the weighted fusion needs a weight per stream")
        if self.fusion_weights is not None:
            unknown = sorted(set(self.fusion_weights) - set(self.streams))
            missing = sorted(set(self.streams) - set(self.fusion_weights))
            if unknown or missing:
                raise ValueError(f"fusion_weights: must name each stream exactly once (unknown: {unknown or 'none'}, "
                                 f"missing: {missing or 'none'})")
            if any(w < 0 for w in self.fusion_weights.values()) or sum(self.fusion_weights.values()) <= 0:
                raise ValueError("fusion_weights: weights must be >= 0 and not all zero")
        if self.lr_steps != sorted(set(self.lr_steps)) or any(s <= 0 for s in self.lr_steps):
            raise ValueError(f"lr_steps: must be strictly increasing positive iterations, got {self.lr_steps}")
        return self

    def train_params(self, stream: str) -> TrainParams:
        from essp.training.trainer import TrainParams

        spec = self.streams[stream]
        return TrainParams(arch=spec.arch, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr,
                           lr_steps=self.lr_steps, lr_gamma=self.lr_gamma, momentum=self.momentum,
                           weight_decay=self.weight_decay, dropout=spec.dropout, pretrained=spec.pretrained,
                           seed=self.seed, device=self.device)

    def features(self) -> dict[str, dict[str, Any]]:
        return {name: dict(stream.options) for name, stream in self.streams.items()}


def parse_spec(values: dict[str, Any]) -> RunSpec:
    """A RunSpec from user values, with errors that name each bad parameter."""
    from pydantic import ValidationError

    try:
        return RunSpec.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}"
                             for err in exc.errors())
        raise RunSpecError(f"bad training parameters: {problems}") from None
