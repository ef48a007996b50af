"""Recipe presets (issue 14): a preset fills the params left at their defaults, a changed value wins, the recipe's
ImageNet weights must be given, and the temporal net of a preset starts from them by cross-modality averaging."""

from __future__ import annotations

import pytest
import torch

from essp.compat import import_torchvision
from essp.lifecycle.params import RunParams, RunParamsError, parse_params
from essp.lifecycle.presets import PRESETS, preset_names
from essp.settings import Settings
from essp.training.models import build_model, cross_modality_init

torchvision = import_torchvision()


def test_every_preset_is_a_valid_run_and_is_in_the_trigger_form():
    schema = RunParams.model_json_schema()["properties"]["preset"]
    allowed = next(b for b in schema["anyOf"] if b.get("type") == "string")["enum"]
    assert allowed == preset_names() and len(PRESETS) == 6
    for name, recipe in PRESETS.items():
        (stream,) = recipe["streams"]
        spec = parse_params({"preset": name, "run": "p", "pretrained": {stream: "s3://essp-models/imagenet.pt"}})
        assert spec.size == 224 and spec.length == 10 and spec.lr_steps == recipe["lr_steps"]
        assert spec.train_params(stream).dropout == recipe["dropout"][stream]
        assert spec.stream(stream).arch == name.rsplit("-", 1)[1]


def test_a_preset_fills_the_defaults_and_a_changed_value_wins():
    weights = {"pretrained": {"flow": "s3://essp-models/resnet50-imagenet.pt"}}
    spec = parse_params({"preset": "paper-temporal-resnet50", "run": "p", **weights})
    assert (spec.streams, spec.flow_arch, spec.lr, spec.lr_steps, spec.flow_method) == (
        ["flow"], "resnet50", 0.005, [12000, 18000], "tvl1")
    assert spec.train_params("flow").dropout == 0.7 and spec.batch_size == 64
    # the form sends every param: the defaults are filled, the changed ones kept
    form = {**RunParams().model_dump(mode="json"), "preset": "paper-temporal-resnet50", "run": "p", **weights,
            "lr": 0.002, "epochs": 40}
    spec = parse_params(form)
    assert (spec.lr, spec.epochs, spec.lr_steps, spec.flow_arch) == (0.002, 40, [12000, 18000], "resnet50")


@pytest.mark.parametrize("values, named", [
    ({"preset": "paper-temporal-resnet50"}, "give pretrained.flow"),
    ({"preset": "imagenet-magic"}, "preset: 'imagenet-magic' is not one of paper-"),
    ({"dropout": {"audio": 0.5}}, "dropout"),
    ({"dropout": {"rgb": 1.0}}, "dropout"),
])
def test_bad_presets_and_dropouts_are_refused_naming_them(values, named):
    with pytest.raises(RunParamsError, match=named):
        parse_params({"run": "p", **values})


def test_the_temporal_net_of_a_preset_starts_from_imagenet_weights_by_cross_modality(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.manual_seed(3)
    imagenet = torchvision.models.resnet50().state_dict()  # the shapes of torchvision's ImageNet checkpoint
    torch.save(imagenet, weights / "resnet50.pt")
    spec = parse_params({"preset": "paper-temporal-resnet50", "run": "p",
                         "pretrained": {"flow": str(weights / "resnet50.pt")}})
    params = spec.train_params("flow")
    model = build_model(params.arch, "flow", num_classes=101, length=spec.length, dropout=params.dropout,
                        pretrained=params.pretrained, settings=Settings(pretrained_dirs=str(weights)))
    first = next(v for k, v in model.state_dict().items() if v.ndim == 4)
    assert first.shape[1] == 2 * spec.length
    assert torch.allclose(first, cross_modality_init(imagenet["conv1.weight"], 2 * spec.length))
