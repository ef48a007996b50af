"""The knobs of training one stream, declared once (pydantic only, no torch).

:class:`OptimParams` holds the knobs a run's every stream shares (epochs, batch, the SGD schedule, seed,
device), each with the title, description and form section the trigger form shows;
:class:`essp.lifecycle.params.RunParams` (a run's params: the DAG's form, `essp train`'s options)
extends it, and :class:`TrainParams` (what :class:`~essp.training.trainer.StreamTrainer` takes) adds
the stream's own: its architecture, starting weights and numerics.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from essp.training.architectures import ARCHITECTURES

# The trigger forms' sections, in the order they show (a section not listed comes after these).
SECTIONS = ("Data", "Model", "Training", "Workers", "Evaluation", "Run")


def knob(default: Any = ..., *, title: str, description: str, section: str, **limits: Any) -> Any:
    """A param as the trigger form shows it: a pydantic Field with its title, description and form section.
    ``default_factory`` and the pydantic limits (ge, le, gt, lt, pattern, min_length, ...) pass through;
    ``enum`` (a callable returning the allowed names, e.g. a registry's) and ``items_enum`` (the same
    for a list's items) are put into the JSON schema when it is generated, so a plugin registered
    before the form is built shows up in it."""
    enum, items_enum = limits.pop("enum", None), limits.pop("items_enum", None)
    extra_schema = limits.pop("schema", {})

    def extra(schema: dict[str, Any]) -> None:
        schema["section"] = section
        schema.update(extra_schema)
        if enum is not None:
            _target(schema)["enum"] = list(enum())
        if items_enum is not None:
            _target(schema).setdefault("items", {})["enum"] = list(items_enum())

    if default is not ... and "default_factory" not in limits:
        limits["default"] = default
    return Field(title=title, description=description, json_schema_extra=extra, **limits)


def _target(schema: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional field's schema (``anyOf: [X, null]``), else the schema."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") != "null":
            return branch
    return schema


class FormParams(BaseModel):
    """Base of the models whose fields are a DAG's params (declared with :func:`knob`): unknown names are
    refused, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class OptimParams(FormParams):
    """What every stream of a run trains with."""

    epochs: int = knob(6, ge=1, le=10_000, title="Epochs", section="Training",
                       description="Epochs to train (a run resumes from its checkpoints).")
    batch_size: int = knob(16, ge=2, le=4096, title="Batch size", section="Training",
                           description="Samples per step, per trainer process (DistributedDataParallel).")
    lr: float = knob(0.01, gt=0, le=10, title="Learning rate", section="Training",
                     description="Initial SGD learning rate.")
    lr_steps: list[int] = knob(default_factory=list, title="LR decay steps", section="Training",
                               description="Iterations at which the learning rate is multiplied by lr_gamma "
                                           "(strictly increasing).", schema={"items": {"type": "integer",
                                                                                        "minimum": 1}})
    lr_gamma: float = knob(0.1, gt=0, le=1, title="LR decay factor", section="Training",
                           description="Multiplier at each LR step.")
    momentum: float = knob(0.9, ge=0, lt=1, title="Momentum", section="Training", description="SGD momentum.")
    weight_decay: float = knob(5e-4, ge=0, title="Weight decay", section="Training",
                               description="SGD weight decay.")
    seed: int = knob(0, ge=0, title="Seed", section="Training",
                     description="Seeds the epoch plans and the initial weights.")
    device: str = knob("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", title="Device", section="Training",
                       description="auto (CUDA when there is one), cpu, cuda or cuda:N.")

    @field_validator("lr_steps")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        if any(s <= 0 for s in steps) or steps != sorted(set(steps)):
            raise ValueError(f"must be strictly increasing positive iterations, got {steps}")
        return steps


class TrainParams(OptimParams):
    """The knobs of one stream's training: the shared ones and the stream's own."""

    arch: str = Field("tiny", description="Architecture (a name of essp.training.architectures).")
    dropout: float | None = Field(None, ge=0, lt=1, description="None: the architecture's default.")
    pretrained: str | None = Field(None, description="Weights to start from: a file or an s3:// URI.")
    amp: bool | None = Field(None, description="bf16 autocast; None: on for CUDA, off on CPU.")
    channels_last: bool | None = Field(None, description="None: on for CUDA, off on CPU.")
    precise_bn_batches: int = Field(16, ge=0, le=1000, description=(
        "At each epoch end, recompute BatchNorm statistics with the final weights over the epoch's last "
        "N batches (0: keep the running averages)."))

    @field_validator("arch")
    @classmethod
    def _known(cls, arch: str) -> str:
        ARCHITECTURES.get(arch)
        return arch
