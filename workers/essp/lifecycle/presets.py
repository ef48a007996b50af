"""Training recipes by name: the `preset` param of a run (issue 14).

A preset is a set of run params: the stream and its network, the input (224 x 224, L = 10 flow fields), the
SGD schedule (learning rate and its steps in iterations, decayed by 10), dropout, and fine-tuning from
ImageNet weights (the ``pretrained`` param: a file under ``ESSP_PRETRAINED_DIRS`` or an object of the models
bucket; a temporal net is initialised from RGB weights by cross-modality averaging, essp.training.models).
They follow the two-stream practice the paper builds on: for VGG, Wang et al., "Towards Good Practices for
Very Deep Two-Stream ConvNets" (2015: spatial lr 0.001 decayed every 4,000 iterations, temporal lr 0.005
decayed at 10,000 and 16,000, dropout 0.9); for ResNets, TSN (Wang et al. 2016: spatial lr 0.001 decayed at
2,000 and 4,000, temporal lr 0.005 decayed at 12,000 and 18,000, dropout 0.8 and 0.7). The paper's own tables
report its streams by network (VGG-19, ResNet-50, ResNet-152) and modality; the presets are named after that
grid, ``paper-<spatial|temporal>-<network>``, one stream each (the two streams' schedules differ, and a run's
optimiser knobs are shared by its streams). Their schedules count iterations at a global batch of 256
(``batch_size`` 64 a process, 4 processes); with other batches scale the steps.

A preset only fills params left at their defaults (the trigger form sends every param, so a value equal to
the default cannot be told from one not given): a value the user changed wins.
"""

from __future__ import annotations

from typing import Any

from essp.errors import UserError

_INPUT = {"size": 224, "length": 10, "batch_size": 64, "momentum": 0.9, "weight_decay": 5e-4, "lr_gamma": 0.1}
_SPATIAL = {"lr": 0.001, "streams": ["rgb"]}
_TEMPORAL = {"lr": 0.005, "streams": ["flow"], "flow_method": "tvl1"}

PRESETS: dict[str, dict[str, Any]] = {
    "paper-spatial-vgg19": {**_INPUT, **_SPATIAL, "rgb_arch": "vgg19", "lr_steps": [4000, 8000],
                            "dropout": {"rgb": 0.9}},
    "paper-temporal-vgg19": {**_INPUT, **_TEMPORAL, "flow_arch": "vgg19", "lr_steps": [10000, 16000],
                             "dropout": {"flow": 0.9}},
    "paper-spatial-resnet50": {**_INPUT, **_SPATIAL, "rgb_arch": "resnet50", "lr_steps": [2000, 4000],
                               "dropout": {"rgb": 0.8}},
    "paper-temporal-resnet50": {**_INPUT, **_TEMPORAL, "flow_arch": "resnet50", "lr_steps": [12000, 18000],
                                "dropout": {"flow": 0.7}},
    "paper-spatial-resnet152": {**_INPUT, **_SPATIAL, "rgb_arch": "resnet152", "lr_steps": [2000, 4000],
                                "dropout": {"rgb": 0.8}},
    "paper-temporal-resnet152": {**_INPUT, **_TEMPORAL, "flow_arch": "resnet152", "lr_steps": [12000, 18000],
                                 "dropout": {"flow": 0.7}},
}

class PresetError(UserError, ValueError):
    """An unknown preset, or a preset whose recipe needs a param the run does not give."""


def preset_names() -> list[str]:
    return sorted(PRESETS)


def apply_preset(values: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``values`` with the named preset's params filled in where a value is missing or equal to its default
    (``defaults``: each param's default); checks that the recipe's ImageNet weights are given."""
    name = values.get("preset")
    if not name:
        return values
    if name not in PRESETS:
        raise PresetError(f"preset: {name!r} is not one of {', '.join(preset_names())}")
    out = dict(values)
    for key, value in PRESETS[name].items():
        if key not in out or out[key] == defaults.get(key):
            out[key] = value
    missing = [s for s in out["streams"] if s not in (out.get("pretrained") or {})]
    if missing:
        raise PresetError(f"preset {name}: the recipe fine-tunes from ImageNet weights; give pretrained."
                          f"{missing[0]} (a torchvision state_dict: a file under ESSP_PRETRAINED_DIRS or an s3:// "
                          "object of the models bucket; a temporal net is initialised from RGB weights by "
                          "cross-modality averaging)")
    return out
