from __future__ import annotations

import subprocess
import sys

import torch

from essp.compat import import_torchvision


def test_torchvision_imports_through_the_guard_and_its_models_run():
    torchvision = import_torchvision()
    model = torchvision.models.resnet18(num_classes=7)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    from torchvision.transforms import v2

    resize = v2.Resize((32, 40))
    assert resize(torch.rand(3, 64, 64)).shape == (3, 32, 40)


def test_the_guard_is_needed_exactly_when_the_wheels_mismatch():
    """A plain import fails with CPU torch next to the CUDA torchvision wheel (pytorch/vision#9085);
    with a matching pair it succeeds and the guard does nothing."""
    plain = subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True, text=True)
    guarded = subprocess.run(
        [sys.executable, "-c", "from essp import compat; tv = compat.import_torchvision(); "
                               "print(compat.guard_applied, tv.__version__)"],
        capture_output=True, text=True)
    assert guarded.returncode == 0, guarded.stderr
    applied = guarded.stdout.split()[0] == "True"
    if plain.returncode != 0:
        assert "operator torchvision::nms does not exist" in plain.stderr
        assert applied
    else:
        assert not applied
