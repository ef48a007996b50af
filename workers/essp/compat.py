"""The one compatibility guard of the project: importing torchvision next to a CPU-only torch.

The pinned torchvision 0.28.0 wheel is a CUDA build. Next to the CPU torch 2.13.0 wheel its compiled
ops library does not load, and ``import torchvision`` then raises
``RuntimeError: operator torchvision::nms does not exist`` while registering fake kernels for ops
that were never defined (pytorch/vision#9085). ESSP needs torchvision's models and transforms, not
its detection ops, so the guard defines the schemas of the two ops that the import registers fakes
for, and imports again. The ops themselves stay unusable and say so when called
("Couldn't load custom C++ ops"). Everything in ESSP imports torchvision through
:func:`import_torchvision`; with a matching torch/torchvision pair (the GPU image) the guard is a
plain import.
"""

from __future__ import annotations

import sys
from types import ModuleType

_MISSING_OP_ERROR = "operator torchvision::nms does not exist"
# Kept alive for the life of the process: a dropped Library object un-defines its ops.
_fallback_library = None
guard_applied = False


def import_torchvision() -> ModuleType:
    """``import torchvision``, working around a CUDA torchvision wheel beside CPU torch."""
    global _fallback_library, guard_applied
    try:
        import torchvision
        return torchvision
    except RuntimeError as exc:
        if _MISSING_OP_ERROR not in str(exc):
            raise
    import torch

    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _fallback_library = torch.library.Library("torchvision", "DEF")
    _fallback_library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _fallback_library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    guard_applied = True
    import torchvision

    return torchvision
