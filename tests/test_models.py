"""Stream models: shapes of every architecture, cross-modality init, checkpoint loading, input normalisation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from essp.compat import import_torchvision
from essp.errors import EsspError
from essp.training.architectures import ARCHITECTURES
from essp.training.models import (
    ModelError,
    StreamModel,
    build_model,
    count_parameters,
    cross_modality_init,
    load_pretrained,
    normalise_batch,
    stream_channels,
)

torchvision = import_torchvision()

LENGTH = 10  # flow: 2L = 20 channels


# Models more than one test uses, built once (VGG takes seconds); the rest are built and dropped per test
# so that the module never holds all ~2.5 GB of parameters at once.
REUSED = {("vgg19", "rgb"), ("vgg19", "flow"), ("resnet152", "flow"), ("resnet18", "rgb")}


@pytest.fixture(scope="module")
def built():
    """A seeded build of (arch, stream) with 7 classes; the REUSED ones are cached for this module."""
    cache: dict[tuple[str, str], StreamModel] = {}

    def get(arch: str, stream: str) -> StreamModel:
        if (arch, stream) in cache:
            return cache[arch, stream]
        torch.manual_seed(0)
        model = build_model(arch, stream, num_classes=7, length=LENGTH)
        if (arch, stream) in REUSED:
            cache[arch, stream] = model
        return model

    yield get
    cache.clear()


def test_stream_channels():
    assert stream_channels("rgb", 10) == 3
    assert stream_channels("flow", 10) == 20
    assert stream_channels("framediff", 5) == 5
    with pytest.raises(ModelError, match="'depth'.*rgb, flow, framediff"):
        stream_channels("depth", 10)
    with pytest.raises(ModelError, match="length 0"):
        stream_channels("flow", 0)


@pytest.mark.parametrize("arch", ARCHITECTURES.names())
@pytest.mark.parametrize("stream", ["rgb", "flow"])
def test_every_architecture_builds_and_runs(arch, stream, built):
    model = built(arch, stream).eval()
    expected_channels = 3 if stream == "rgb" else 2 * LENGTH
    assert (model.arch, model.stream, model.in_channels, model.num_classes) == (arch, stream, expected_channels, 7)
    assert model.dropout == ARCHITECTURES.get(arch).default_dropout(stream)
    assert model.dropout == {"tiny": {"rgb": 0.2, "flow": 0.3}, "vgg": {"rgb": 0.8, "flow": 0.9}}.get(
        arch if arch == "tiny" else arch[:3], {"rgb": 0.2, "flow": 0.5})[stream]
    x = torch.randn(2, expected_channels, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.features(x)
        both = model.forward_with_features(x)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, model.feature_dim)
    assert torch.equal(both[0], logits)
    assert torch.equal(both[1], feats)
    expected_dim = {"tiny": 128, "resnet18": 512, "resnet34": 512, "vgg16": 4096, "vgg19": 4096}.get(arch, 2048)
    assert model.feature_dim == expected_dim


def test_resnet152_flow_at_64(built):
    model = built("resnet152", "flow").eval()
    with torch.no_grad():
        logits, feats = model.forward_with_features(torch.randn(1, 20, 64, 64))
    assert logits.shape == (1, 7) and feats.shape == (1, 2048)


def test_forward_with_features_is_one_pass(built):
    model = built("resnet18", "rgb").eval()
    calls = []
    handle = model.net.layer4.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            model.forward_with_features(torch.randn(1, 3, 32, 32))
    finally:
        handle.remove()
    assert len(calls) == 1


def test_unknown_arch_and_bad_num_classes():
    with pytest.raises(ModelError, match="'resnet9'.*tiny, resnet18.*vgg19"):
        build_model("resnet9", "rgb", num_classes=3)
    with pytest.raises(ModelError, match="num_classes 1"):
        build_model("tiny", "rgb", num_classes=1)
    with pytest.raises(ModelError, match="'depth'"):
        build_model("tiny", "depth", num_classes=3)
    assert issubclass(ModelError, EsspError) and issubclass(ModelError, ValueError)


def test_construction_is_deterministic_under_seed():
    torch.manual_seed(123)
    first = build_model("resnet18", "flow", num_classes=4).state_dict()
    torch.manual_seed(123)
    second = build_model("resnet18", "flow", num_classes=4).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_cross_modality_init_numbers():
    weight = torch.arange(2 * 3 * 1 * 2, dtype=torch.float32).reshape(2, 3, 1, 2)
    # Output 0, tap 0: channels 0, 2, 4 -> mean 2; tap 1: 1, 3, 5 -> 3. Output 1: 6, 8, 10 -> 8; 7, 9, 11 -> 9.
    out = cross_modality_init(weight, 5)
    assert out.shape == (2, 5, 1, 2)
    expected = torch.tensor([[[[2.0, 3.0]]], [[[8.0, 9.0]]]]).expand(2, 5, 1, 2)
    assert torch.equal(out, expected)
    assert out.is_contiguous()
    with pytest.raises(ModelError, match="in_channels 0"):
        cross_modality_init(weight, 0)
    with pytest.raises(ModelError, match="weight_rgb"):
        cross_modality_init(torch.zeros(3, 3), 4)


def test_load_torchvision_rgb_into_flow_resnet18(tmp_path):
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)  # 1000 classes, 3 channels
    path = tmp_path / "resnet18_imagenet.pt"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    model = build_model("resnet18", "flow", num_classes=5, length=LENGTH)
    head_before = model.net.fc.weight.detach().clone()
    report = load_pretrained(model, path)

    assert report["adapted"] == ["net.conv1.weight"]
    assert sorted(report["skipped"]) == ["net.fc.bias", "net.fc.weight"]
    conv = model.net.conv1.weight.detach()
    assert conv.shape == (64, 20, 7, 7)
    mean = source.conv1.weight.detach().mean(dim=1, keepdim=True)
    for channel in range(20):
        assert torch.equal(conv[:, channel : channel + 1], mean)
    src_state = source.state_dict()
    model_state = model.state_dict()
    for key in ("layer1.0.conv1.weight", "layer4.1.bn2.running_var", "bn1.bias", "layer3.0.downsample.0.weight"):
        assert torch.equal(model_state[f"net.{key}"], src_state[key]), key
    assert f"net.{'layer4.1.bn2.running_var'}" in report["loaded"]
    assert torch.equal(model.net.fc.weight, head_before)  # head kept as initialised


def test_build_model_with_pretrained_and_same_classes_loads_head(tmp_path):
    torch.manual_seed(3)
    source = torchvision.models.resnet18(weights=None, num_classes=6)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", "rgb", num_classes=6, pretrained=str(path))
    assert model.pretrained_report == {"loaded": list(model.state_dict()), "adapted": [], "skipped": []}
    assert torch.equal(model.net.fc.weight, source.fc.weight)
    assert torch.equal(model.net.conv1.weight, source.conv1.weight)


def test_load_our_checkpoint_format(tmp_path):
    torch.manual_seed(4)
    trained = build_model("tiny", "flow", num_classes=3, length=LENGTH)
    path = tmp_path / "ckpt.pt"
    optimiser = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    trained(torch.randn(2, 20, 32, 32)).sum().backward()
    optimiser.step()
    # Shaped like the trainer's checkpoints: plain values, optimiser state and RNG state next to "model".
    checkpoint = {"format": 1, "arch": "tiny", "epoch": 7, "history": [{"loss": 1.5}], "params": {"lr_steps": [5]},
                  "model": trained.state_dict(), "optimizer": optimiser.state_dict(), "rng": torch.get_rng_state()}
    torch.save(checkpoint, path)
    torch.manual_seed(5)
    fresh = build_model("tiny", "flow", num_classes=3, length=LENGTH)
    report = load_pretrained(fresh, path)
    assert report["adapted"] == [] and report["skipped"] == []
    assert len(report["loaded"]) == len(trained.state_dict())
    for key, value in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key

    # An RGB tiny checkpoint with another head into a flow tiny: first conv adapted, head skipped.
    rgb = build_model("tiny", "rgb", num_classes=9)
    torch.save({"model": rgb.state_dict()}, path)
    report = load_pretrained(fresh, path)
    assert report["adapted"] == ["net.features.0.weight"]
    assert sorted(report["skipped"]) == ["net.fc.bias", "net.fc.weight"]
    expected = rgb.net.features[0].weight.mean(dim=1, keepdim=True).expand(-1, 20, -1, -1)
    assert torch.equal(fresh.net.features[0].weight, expected)


def test_mismatched_shape_raises_naming_key_and_shapes(tmp_path):
    model = build_model("tiny", "rgb", num_classes=3)
    state = model.state_dict()
    state["net.features.3.weight"] = torch.zeros(64, 16, 3, 3)
    path = tmp_path / "bad.pt"
    torch.save({"model": state}, path)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ModelError, match=r"net\.features\.3\.weight.*\(64, 16, 3, 3\).*\(64, 32, 3, 3\)"):
        load_pretrained(model, path)
    # All or nothing: nothing was copied before the error.
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_missing_key_and_wrong_arch_raise(tmp_path):
    model = build_model("tiny", "rgb", num_classes=3)
    state = model.state_dict()
    del state["net.features.1.running_mean"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(ModelError, match=r"missing key.*net\.features\.1\.running_mean \(32,\)"):
        load_pretrained(model, path)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    with pytest.raises(ModelError, match="partial.pt does not fit tiny/rgb"):
        load_pretrained(model, path)


def test_flow_checkpoint_into_rgb_is_an_error(tmp_path):
    flow = build_model("tiny", "flow", num_classes=3, length=2)
    path = tmp_path / "flow.pt"
    torch.save({"model": flow.state_dict()}, path)
    with pytest.raises(ModelError, match=r"net\.features\.0\.weight.*\(32, 4, 5, 5\).*\(32, 3, 5, 5\)"):
        load_pretrained(build_model("tiny", "rgb", num_classes=3), path)


def test_missing_or_unreadable_source_names_it(tmp_path):
    model = build_model("tiny", "rgb", num_classes=3)
    missing = tmp_path / "nowhere" / "model.pt"
    with pytest.raises(ModelError, match=str(missing)):
        load_pretrained(model, missing)
    with pytest.raises(ModelError, match="model.pt"):
        build_model("tiny", "rgb", num_classes=3, pretrained=str(missing))
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="junk.pt is not a readable torch checkpoint"):
        load_pretrained(model, junk)
    with pytest.raises(ModelError, match="s3://bucket/key.*needs settings"):
        load_pretrained(model, "s3://bucket/key")


def test_normalise_rgb():
    batch = torch.tensor([0, 255, 128], dtype=torch.uint8).view(1, 3, 1, 1).expand(2, 3, 2, 2).contiguous()
    out = normalise_batch("rgb", batch)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 2, 2)
    expected = [(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    assert torch.allclose(out[0, :, 0, 0], torch.tensor(expected), atol=1e-6)
    assert batch.dtype == torch.uint8  # input untouched


def test_normalise_flow_and_framediff():
    codes = torch.tensor([0, 255, 127, 128], dtype=torch.uint8).view(1, 4, 1, 1)
    for stream in ("flow", "framediff"):
        out = normalise_batch(stream, codes)
        assert out.flatten().tolist() == pytest.approx([-1.0, 1.0, -0.5 / 127.5, 0.5 / 127.5])
    # The midpoint 127.5 of the code range is zero motion: 127 and 128 are symmetric around it.
    out = normalise_batch("flow", codes).flatten()
    assert out[2] == -out[3]


def test_normalise_keeps_channels_last():
    batch = torch.randint(0, 256, (2, 20, 4, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    out = normalise_batch("flow", batch)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, (batch.float() - 127.5) / 127.5)
    rgb = torch.randint(0, 256, (2, 3, 4, 5), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    assert normalise_batch("rgb", rgb).is_contiguous(memory_format=torch.channels_last)


def test_normalise_rejects_bad_input():
    with pytest.raises(ModelError, match="uint8"):
        normalise_batch("flow", torch.zeros(1, 2, 4, 4))
    with pytest.raises(ModelError, match=r"rgb batch must have 3 channels.*\(1, 4, 4, 4\)"):
        normalise_batch("rgb", torch.zeros(1, 4, 4, 4, dtype=torch.uint8))
    with pytest.raises(ModelError, match="even"):
        normalise_batch("flow", torch.zeros(1, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(ModelError, match=r"\(B, C, H, W\)"):
        normalise_batch("flow", torch.zeros(2, 4, 4, dtype=torch.uint8))


def vgg_dropouts(model: StreamModel) -> list[float]:
    return [m.p for m in model.net.classifier if isinstance(m, nn.Dropout)]


def test_vgg19_dropout_defaults_and_override(built):
    assert vgg_dropouts(built("vgg19", "flow")) == [0.9, 0.9]
    assert built("vgg19", "flow").dropout == 0.9
    assert vgg_dropouts(built("vgg19", "rgb")) == [0.8, 0.8]
    assert ARCHITECTURES.get("vgg19").default_dropout("framediff") == 0.9
    override = build_model("vgg16", "flow", num_classes=3, dropout=0.5)
    assert vgg_dropouts(override) == [0.5, 0.5] and override.dropout == 0.5
    resnet = build_model("resnet18", "flow", num_classes=3, dropout=0.25)
    assert resnet.head_dropout.p == 0.25
    with pytest.raises(ModelError, match="dropout 1.0"):
        build_model("tiny", "flow", num_classes=3, dropout=1.0)


def test_tiny_is_small_and_overfits_a_batch():
    torch.manual_seed(0)
    model = build_model("tiny", "flow", num_classes=5, length=LENGTH)
    assert count_parameters(model) < 1_000_000
    codes = torch.randint(0, 256, (4, 20, 64, 64), dtype=torch.uint8)
    x = normalise_batch("flow", codes)
    y = torch.tensor([0, 1, 2, 3])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0], losses


def test_count_parameters(built):
    assert count_parameters(nn.Linear(3, 2)) == 8
    # resnet18 has 11,689,512 parameters with ImageNet's 1000-way fc (512 * 1000 + 1000); ours is 7-way.
    assert count_parameters(built("resnet18", "rgb")) == 11_689_512 - 513_000 + 7 * 512 + 7


def test_pretrained_weights_load_from_s3_and_a_missing_object_is_named(settings):
    import io

    from essp.clients.s3 import ObjectStore

    torch.manual_seed(3)
    rgb = build_model("tiny", "rgb", num_classes=5)
    buffer = io.BytesIO()
    torch.save({"model": rgb.state_dict()}, buffer)
    store = ObjectStore(settings)
    store.ensure_bucket(settings.bucket_models)
    store.put_bytes(settings.bucket_models, "pretrained/tiny-rgb.pt", buffer.getvalue())
    uri = f"s3://{settings.bucket_models}/pretrained/tiny-rgb.pt"
    flow = build_model("tiny", "flow", num_classes=5, length=4, pretrained=uri, settings=settings)
    first = flow.first_conv_key + ".weight"
    expected = rgb.state_dict()[first].mean(dim=1, keepdim=True).expand(-1, 8, -1, -1)
    assert torch.allclose(flow.state_dict()[first], expected)
    with pytest.raises(ModelError, match="missing.pt"):
        build_model("tiny", "flow", num_classes=5, length=4, pretrained=uri.replace("tiny-rgb", "missing"),
                    settings=settings)



@pytest.mark.parametrize("stream,channels", [("flow_bi", 4 * LENGTH), ("warped_flow", 2 * LENGTH),
                                             ("framestack", LENGTH)])
def test_the_flow_family_and_framestack_streams_build_and_run(stream, channels, tmp_path):
    assert stream_channels(stream, LENGTH) == channels
    torch.manual_seed(0)
    model = build_model("tiny", stream, num_classes=5, length=LENGTH).eval()
    assert (model.stream, model.in_channels) == (stream, channels)
    codes = torch.randint(0, 256, (2, channels, 32, 32), dtype=torch.uint8)
    x = normalise_batch(stream, codes)
    assert torch.allclose(x, (codes.float() - 127.5) / 127.5)  # flow-like codes; grey levels centred alike
    with torch.no_grad():
        assert model(x).shape == (2, 5)
    # Started from an RGB checkpoint, the first conv is the cross-modality average, replicated.
    rgb = build_model("tiny", "rgb", num_classes=5)
    torch.save({"model": rgb.state_dict()}, tmp_path / "rgb.pt")
    adapted = build_model("tiny", stream, num_classes=5, length=LENGTH, pretrained=tmp_path / "rgb.pt")
    first = f"{adapted.first_conv_key}.weight"
    assert adapted.pretrained_report["adapted"] == [first]
    expected = rgb.state_dict()[first].mean(dim=1, keepdim=True).expand(-1, channels, -1, -1)
    assert torch.equal(adapted.state_dict()[first], expected)
    per_pair = channels // LENGTH
    if per_pair > 1:  # a channel count that is no whole number of pairs
        with pytest.raises(ModelError, match=rf"{stream} batch must have .*\({per_pair}L\)"):
            normalise_batch(stream, torch.zeros(1, channels + 2 * per_pair - 1, 4, 4, dtype=torch.uint8))
