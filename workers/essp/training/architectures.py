"""The architectures a stream can train, by name: what each one is (its family and default dropout per
stream), light enough for the DAGs' trigger forms to list (no torch here; :mod:`essp.training.models`
builds them). Registering one more torchvision ResNet or VGG is one :func:`register_architecture` call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from essp.errors import EsspError
from essp.registry import Registry

Family = Literal["tiny", "resnet", "vgg"]


class UnknownArchitecture(EsspError, ValueError):
    """An architecture name that is not registered."""


@dataclass(frozen=True)
class Architecture:
    """One network: ``family`` says how :func:`essp.training.models.build_model` builds and adapts it (the
    torchvision constructor of the same name for resnet and vgg), ``dropout`` its default per stream."""

    name: str
    family: Family
    dropout: tuple[tuple[str, float], ...]

    def default_dropout(self, stream: str) -> float:
        table = dict(self.dropout)
        return table.get(stream, table["flow"] if stream != "rgb" else table["rgb"])


ARCHITECTURES: Registry[Architecture] = Registry("architecture", unknown=UnknownArchitecture)


def register_architecture(name: str, family: Family, *, rgb: float, temporal: float) -> Architecture:
    """Register ``name`` (a torchvision constructor of ``family``, or the tiny net) with its default dropout
    for the rgb stream and for the temporal streams (flow, frame differences)."""
    return ARCHITECTURES.add(name, Architecture(name, family, (("rgb", rgb), ("flow", temporal),
                                                               ("framediff", temporal))))


# Dropout before the classifier (ResNet, tiny) or on VGG's two hidden FC layers. Two-stream practice:
# temporal streams see few, highly correlated samples and overfit hardest, so they get the most dropout;
# VGG's 4096-wide FC layers get the 0.9/0.8 of Simonyan & Zisserman and TSN; ResNets, which have no FC
# hidden layers, a moderate rate; tiny little, since it is small enough to underfit rather than overfit.
register_architecture("tiny", "tiny", rgb=0.2, temporal=0.3)
for _depth in (18, 34, 50, 101, 152):
    register_architecture(f"resnet{_depth}", "resnet", rgb=0.2, temporal=0.5)
for _depth in (16, 19):
    register_architecture(f"vgg{_depth}", "vgg", rgb=0.8, temporal=0.9)


def architecture_names() -> list[str]:
    return ARCHITECTURES.names()
