"""Two-stream classifiers: an RGB (spatial) stream and temporal streams on stacked flow (forward, bi-directional
or warped), frame differences or grey frames.

Every model is a :class:`StreamModel` around a torchvision ResNet/VGG or our own small ``tiny`` CNN. The
stream decides the number of input channels (:func:`stream_channels`); the first conv is widened for the
temporal streams and, when started from an RGB checkpoint, initialised by cross-modality averaging (Wang et
al., "Temporal Segment Networks", 2016). Weights only ever come from a local file or S3, never from a hub.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from essp.compat import import_torchvision
from essp.errors import EsspError
from essp.training.architectures import ARCHITECTURES, UnknownArchitecture

if TYPE_CHECKING:
    from essp.settings import Settings

torchvision = import_torchvision()

log = logging.getLogger("essp.training.models")

STREAMS = ("rgb", "flow", "framediff", "flow_bi", "warped_flow", "framestack")
TEMPORAL_STREAMS = ("flow", "framediff", "flow_bi", "warped_flow", "framestack")
# Input channels per frame pair of each temporal stream (the extractor of the same name delivers them): x and
# y of one flow field (flow, warped_flow), of a forward and a backward one (flow_bi), or one plane.
CHANNELS_PER_PAIR = {"flow": 2, "framediff": 1, "flow_bi": 4, "warped_flow": 2, "framestack": 1}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Flow and frame differences are quantised so that code 127.5 is zero and 0/255 are -bound/+bound; grey
# frames (framestack) are centred on the same midpoint.
QUANT_ZERO = 127.5

TINY_WIDTHS = (32, 64, 128, 128)


class ModelError(EsspError, ValueError):
    """A model that cannot be built or a checkpoint that does not fit it."""


def stream_channels(stream: str, length: int) -> int:
    """Input channels of a stream: 3 for RGB, 2L for flow and warped_flow (x and y per frame pair), 4L for flow_bi
    (forward then backward), L for frame differences and framestack (one grey plane per pair)."""
    if stream not in STREAMS:
        raise ModelError(f"stream {stream!r} is unknown: known streams are {', '.join(STREAMS)}")
    if stream == "rgb":
        return 3
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ModelError(f"length {length!r} of stream {stream!r} must be a positive integer")
    return CHANNELS_PER_PAIR[stream] * length


def normalise_batch(stream: str, batch: Tensor) -> Tensor:
    """uint8 (B, C, H, W) as the data plane delivers it -> float32 network input, on the batch's own device.

    rgb: /255 then ImageNet mean/std (what torchvision's ImageNet checkpoints expect); flow, flow_bi, warped_flow
    and framediff: (q - 127.5) / 127.5, i.e. [-1, 1] with 0 for no motion; framestack (grey levels, not signed
    codes): the same formula, i.e. /255 then centred and scaled to [-1, 1] (mid-grey 0). The memory format (e.g.
    channels_last) is kept because all arithmetic runs in place on a format-preserving copy.
    """
    if stream not in STREAMS:
        raise ModelError(f"stream {stream!r} is unknown: known streams are {', '.join(STREAMS)}")
    if not isinstance(batch, Tensor):
        raise ModelError(f"batch of stream {stream!r} must be a torch.Tensor, got {type(batch).__name__}")
    if batch.dtype != torch.uint8:
        raise ModelError(f"batch of stream {stream!r} must be uint8, got {batch.dtype}")
    if batch.ndim != 4:
        raise ModelError(f"batch of stream {stream!r} must be (B, C, H, W), got shape {tuple(batch.shape)}")
    channels = batch.shape[1]
    if stream == "rgb" and channels != 3:
        raise ModelError(f"rgb batch must have 3 channels, got shape {tuple(batch.shape)}")
    per_pair = CHANNELS_PER_PAIR.get(stream, 1)
    if channels % per_pair:
        multiple = "an even number" if per_pair == 2 else f"a multiple of {per_pair}"
        raise ModelError(f"{stream} batch must have {multiple} ({per_pair}L) of channels, got shape "
                         f"{tuple(batch.shape)}")
    out = batch.to(dtype=torch.float32, memory_format=torch.preserve_format, copy=True)
    if stream == "rgb":
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=batch.device).view(1, 3, 1, 1)
        return out.div_(255.0).sub_(mean).div_(std)
    return out.sub_(QUANT_ZERO).div_(QUANT_ZERO)


def cross_modality_init(weight_rgb: Tensor, in_channels: int) -> Tensor:
    """First-conv weights for a temporal stream from RGB ones (TSN): mean over input channels, replicated.

    Keeps the ImageNet filters' spatial structure and, as each output sums over all inputs, roughly the scale
    of their responses for inputs of comparable magnitude.
    """
    if not isinstance(weight_rgb, Tensor) or weight_rgb.ndim != 4:
        shape = tuple(weight_rgb.shape) if isinstance(weight_rgb, Tensor) else type(weight_rgb).__name__
        raise ModelError(f"weight_rgb must be a conv weight (out, in, kh, kw), got {shape}")
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ModelError(f"in_channels {in_channels!r} must be a positive integer")
    mean = weight_rgb.mean(dim=1, keepdim=True)
    return mean.expand(-1, in_channels, -1, -1).contiguous()


def count_parameters(model: nn.Module) -> int:
    """Number of scalar parameters (trainable or not), to size models and check the tiny budget."""
    return sum(p.numel() for p in model.parameters())


class TinyNet(nn.Module):
    """Our small CNN: four stride-2 conv-BN-ReLU blocks (32-64-128-128), global average pool, linear.

    Trains in minutes on two CPU cores at 112x112 or less; the stride-2 convs keep the work at full
    resolution to a single small conv.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = TINY_WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for index, width in enumerate(widths):
            kernel = 5 if index == 0 else 3
            layers += [
                nn.Conv2d(previous, width, kernel, stride=2, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            previous = width
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(previous, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the bare network (StreamModel adds dropout before fc)."""
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


# Per family: the state_dict key (inside StreamModel, i.e. with "net.") of the first conv and of the head.
_FIRST_CONV = {"resnet": "net.conv1", "vgg": "net.features.0", "tiny": "net.features.0"}
_HEAD = {"resnet": "net.fc", "vgg": "net.classifier.6", "tiny": "net.fc"}


class StreamModel(nn.Module):
    """One stream's classifier: backbone -> pooled penultimate features -> dropout -> linear head.

    ``features`` gives what sequence fusion consumes; ``forward_with_features`` gives logits and features from
    one pass so that scoring snippets does not run the backbone twice. The backbone lives in ``net`` so that
    its state_dict keys are torchvision's with a ``net.`` prefix.
    """

    def __init__(
        self,
        arch: str,
        stream: str,
        net: nn.Module,
        *,
        in_channels: int,
        num_classes: int,
        feature_dim: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.family = ARCHITECTURES.get(arch).family
        self.stream = stream
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.feature_dim = feature_dim
        self.dropout = dropout
        self.net = net
        # VGG's dropouts sit inside its classifier, before the features are taken.
        self.head_dropout = nn.Identity() if self.family == "vgg" else nn.Dropout(dropout)
        self.pretrained_report: dict[str, list[str]] | None = None

    @property
    def first_conv_key(self) -> str:
        """Module path of the first conv (the one widened to in_channels)."""
        return _FIRST_CONV[self.family]

    @property
    def head_key(self) -> str:
        """Module path of the final linear layer (skipped when loading a checkpoint with other classes)."""
        return _HEAD[self.family]

    @property
    def head(self) -> nn.Linear:
        """The final linear layer."""
        net: Any = self.net
        return net.classifier[6] if self.family == "vgg" else net.fc

    def features(self, x: Tensor) -> Tensor:
        """Pooled penultimate features (B, feature_dim): avgpool for ResNet/tiny, the second FC for VGG."""
        net: Any = self.net
        if self.family == "resnet":
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
            return torch.flatten(net.avgpool(x), 1)
        x = torch.flatten(net.avgpool(net.features(x)), 1)
        if self.family == "vgg":
            return net.classifier[:6](x)
        return x

    def forward_with_features(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, features) from a single backbone pass."""
        feats = self.features(x)
        return self.head(self.head_dropout(feats)), feats

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, num_classes)."""
        return self.forward_with_features(x)[0]

    def extra_repr(self) -> str:
        return (
            f"arch={self.arch!r}, stream={self.stream!r}, in_channels={self.in_channels}, "
            f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, dropout={self.dropout}"
        )


def _widen_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A copy of conv's geometry with in_channels inputs, initialised as torchvision inits its convs."""
    new = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=conv.bias is not None,
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    if new.bias is not None:
        nn.init.zeros_(new.bias)
    return new


def build_model(
    arch: str,
    stream: str,
    *,
    num_classes: int,
    length: int = 10,
    dropout: float | None = None,
    pretrained: str | Path | None = None,
    settings: Settings | None = None,
) -> StreamModel:
    """A StreamModel for one stream; deterministic under the caller's torch.manual_seed.

    ``dropout`` defaults to the architecture's for the stream (:mod:`essp.training.architectures`);
    ``pretrained`` (local path or s3:// URI) is loaded with :func:`load_pretrained`, whose report is logged
    and kept as ``model.pretrained_report``.
    """
    try:
        architecture = ARCHITECTURES.get(arch)
    except UnknownArchitecture as exc:
        raise ModelError(str(exc)) from None
    in_channels = stream_channels(stream, length)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ModelError(f"num_classes {num_classes!r} must be an integer >= 2")
    if dropout is None:
        dropout = architecture.default_dropout(stream)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0.0 <= dropout < 1.0:
        raise ModelError(f"dropout {dropout!r} must be a number in [0, 1)")
    dropout = float(dropout)

    family = architecture.family
    net: Any
    if family == "tiny":
        net = TinyNet(in_channels, num_classes)
        feature_dim = TINY_WIDTHS[-1]
    elif family == "resnet":
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        if in_channels != 3:
            net.conv1 = _widen_conv(net.conv1, in_channels)
        feature_dim = net.fc.in_features
    else:
        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes, dropout=dropout)
        if in_channels != 3:
            net.features[0] = _widen_conv(net.features[0], in_channels)
        feature_dim = net.classifier[6].in_features
    model = StreamModel(
        arch,
        stream,
        net,
        in_channels=in_channels,
        num_classes=num_classes,
        feature_dim=feature_dim,
        dropout=dropout,
    )
    if pretrained is not None:
        report = load_pretrained(model, pretrained, settings)
        model.pretrained_report = report
        log.info(
            "%s/%s from %s: %d tensors loaded, adapted %s, skipped %s",
            arch,
            stream,
            pretrained,
            len(report["loaded"]),
            report["adapted"] or "none",
            report["skipped"] or "none",
        )
    return model


def _read_source(source: str | Path, settings: Settings | None) -> Any:
    """The unpickled object at a local path or s3:// URI (tensors and plain containers only)."""
    name = str(source)
    if name.startswith("s3://"):
        if settings is None:
            raise ModelError(f"pretrained {name}: an s3:// source needs settings to reach S3")
        # Imported here so that building models does not need the S3 client.
        from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri

        try:
            uri = S3Uri.parse(name)
        except ValueError as exc:
            raise ModelError(f"pretrained {name}: {exc}") from None
        try:
            data = ObjectStore(settings).get_bytes(uri.bucket, uri.key)
        except ObjectNotFound as exc:
            raise ModelError(f"pretrained {name} does not exist: {exc}") from None
        stream: Any = io.BytesIO(data)
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelError(f"pretrained {name} does not exist or is not a file")
        stream = path
    try:
        # weights_only: a checkpoint is data, never code to run.
        return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means the same thing to the caller
        raise ModelError(f"pretrained {name} is not a readable torch checkpoint: {exc}") from None


def _strip_prefixes(key: str) -> str:
    """Drop the wrappers DataParallel/DDP ("module.") and torch.compile ("_orig_mod.") add to keys."""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _source_state_dict(obj: Any, name: str) -> dict[str, Tensor]:
    """A StreamModel-keyed state_dict from either our checkpoint ({"model": ...}) or a torchvision one."""
    if isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"pretrained {name} holds neither a state_dict nor a checkpoint with a 'model' state_dict")
    state: dict[str, Tensor] = {}
    for raw_key, value in obj.items():
        if not isinstance(raw_key, str) or not isinstance(value, Tensor):
            raise ModelError(f"pretrained {name}: entry {raw_key!r} is not a named tensor ({type(value).__name__})")
        state[_strip_prefixes(raw_key)] = value
    if not all(key.startswith("net.") for key in state):
        # A bare backbone state_dict (torchvision's, or TinyNet's): StreamModel keeps it under "net.".
        state = {f"net.{key}": value for key, value in state.items()}
    return state


def load_pretrained(model: StreamModel, source: str | Path, settings: Settings | None = None) -> dict[str, list[str]]:
    """Copy weights from a local file or s3:// object into model; all-or-nothing.

    The source is a torchvision-style state_dict of the same architecture or our checkpoint {"model":
    state_dict, ...}. Matching tensors are copied; a 3-channel first conv into a model with other in_channels
    goes through :func:`cross_modality_init`; the head is skipped (kept as initialised) when its shape differs.
    Anything else that does not fit raises ModelError. Returns the keys ``loaded``, ``adapted`` and ``skipped``.
    """
    name = str(source)
    state = _source_state_dict(_read_source(source, settings), name)
    target = model.state_dict()
    first_conv_weight = f"{model.first_conv_key}.weight"
    head_prefix = f"{model.head_key}."

    for kind, keys, shapes_of in (("missing", [k for k in target if k not in state], target),
                                  ("unexpected", [k for k in state if k not in target], state)):
        if keys:
            shapes = ", ".join(f"{key} {tuple(shapes_of[key].shape)}" for key in keys[:5])
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            given = "model" if kind == "missing" else "checkpoint"
            raise ModelError(f"pretrained {name} does not fit {model.arch}/{model.stream}: {kind} key(s) "
                             f"{shapes}{more} ({given} shapes given)")

    # The head is taken or skipped as a whole, so that a weight never meets a bias from another head.
    head_keys = [key for key in target if key.startswith(head_prefix)]
    skip_head = any(state[key].shape != target[key].shape for key in head_keys)
    plan: dict[str, Tensor] = {}
    report: dict[str, list[str]] = {"loaded": [], "adapted": [], "skipped": []}
    for key, dest in target.items():
        src = state[key]
        if skip_head and key in head_keys:
            report["skipped"].append(key)
        elif src.shape == dest.shape:
            plan[key] = src
            report["loaded"].append(key)
        elif key == first_conv_weight and src.ndim == 4 and src.shape[1] == 3 and dest.shape[1] != 3 and (
            src.shape[0:1] + src.shape[2:] == dest.shape[0:1] + dest.shape[2:]
        ):
            plan[key] = cross_modality_init(src, dest.shape[1])
            report["adapted"].append(key)
        else:
            raise ModelError(
                f"pretrained {name} does not fit {model.arch}/{model.stream}: {key} has shape "
                f"{tuple(src.shape)} in the checkpoint but {tuple(dest.shape)} in the model"
            )
    with torch.no_grad():
        for key, value in plan.items():
            target[key].copy_(value)
    return report
