"""The params of a training run, defined once: :class:`RunParams`.

The one model serves every place a run's params show up: the `essp_train` DAG's trigger form (titles,
descriptions, sections, enums and bounds come from its JSON schema, see
:func:`essp.orchestration.params.form_params`), `essp train`'s options, the checks (errors name the
param), the run's ``spec.json`` in S3, and each stream's :class:`~essp.training.params.TrainParams`.
The enums come from the registries: extractors (streams, flow methods), architectures, fusion
strategies. Light on purpose (no torch): the DAG files import it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from essp.contract import RUN_ID_PATTERN, check_run_id
from essp.dataplane.extractors import create_extractor, extractor_class, extractor_kinds
from essp.datasets.validation import MAX_VAL_FRACTION
from essp.deploy.fleet import data_kinds
from essp.errors import EsspError, UserError, describe_validation
from essp.evaluation.fusion import FUSIONS
from essp.evaluation.metrics import DEFAULT_SNIPPETS, PROMOTION_METRICS
from essp.lifecycle.presets import PresetError, apply_preset, preset_names
from essp.training.architectures import ARCHITECTURES
from essp.training.params import FormParams, OptimParams, TrainParams, knob

DEFAULT_REPLICAS = {"decode": 2, "flow": 2, "rgb": 1, "framediff": 0}
SCORE_CHECKPOINTS = ["last", "best"]
ALLOCATIONS = ["static", "validation_loss"]  # essp.lifecycle.allocation
FLOW_KINDS = ("flow", "flow_bi", "warped_flow")  # the extractors that take flow_method
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


# Upper bounds of params whose value can exhaust memory: an epoch's plan is held whole by the master,
# and the run's payloads in flight live in Redis (see RunParams.inflight_bytes).
MAX_SAMPLES_PER_EPOCH = 1_000_000
MAX_INFLIGHT_GIB = 8
# One sample at its largest (RunParams.sample_bytes): its L+1 decoded frames and its flow as float32.
MAX_SAMPLE_MIB = 256
# Data workers of a run in all kinds: each is a process (locally) or a pod, of 100-200 MB resident.
MAX_WORKERS = 512


class RunParamsError(UserError, ValueError):
    """A training run's params are not valid; the message names the param."""


def _flow_methods() -> list[str]:
    return list(extractor_class("flow").option_specs["method"].choices or ())


def _architectures() -> list[str]:
    return ARCHITECTURES.names()


def _keyed_schema(keys: dict[str, Callable[[], Sequence[str]]],
                  more: dict[str, dict[str, Any]] | None = None) -> Callable[[dict[str, Any], type], None]:
    """A model's ``json_schema_extra``: each dict field of ``keys`` takes only the names its callable returns
    (a registry's, read when the schema is made) as keys (``propertyNames``), with the schema keywords of
    ``more`` besides, so that Airflow refuses a wrong key when the run is created (each param is checked
    against its own schema only: what needs two params, e.g. a weight for each of the run's streams, is left
    to the model's validators)."""

    def extra(schema: dict[str, Any], _model: type) -> None:
        for name, allowed in keys.items():
            _object_branch(schema["properties"][name])["propertyNames"] = {"enum": list(allowed())}
        for name, keywords in (more or {}).items():
            _object_branch(schema["properties"][name]).update(keywords)

    return extra


def _object_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The object schema of a dict field, or of an optional one (``anyOf: [object, null]``)."""
    for branch in schema.get("anyOf", [schema]):
        if branch.get("type") == "object":
            return branch
    raise ValueError(f"not the schema of a dict field: {schema}")


@dataclass(frozen=True)
class StreamSpec:
    """One stream of a run, as its params say: the architecture, the extractor's options, the weights to
    start from."""

    name: str
    arch: str
    options: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None


class RunParams(OptimParams):
    """Every knob of a training run: what `essp_train`'s form shows and what `essp train` takes."""

    model_config = ConfigDict(json_schema_extra=_keyed_schema(
        {"pretrained": extractor_kinds, "replicas": data_kinds, "fusion_weights": extractor_kinds,
         "dropout": extractor_kinds},
        {"fusion_weights": {"minProperties": 1}}))

    # -- Data
    dataset: str = knob("synth-demo", min_length=1, title="Dataset", section="Data",
                        description="The manifest to train on: a dataset name (its latest version), name@N, or an "
                                    "s3:// URI of a manifest (`essp dataset ingest` writes them).")
    streams: list[str] = knob(default_factory=lambda: ["rgb", "flow"], min_length=1, title="Streams",
                              section="Data", items_enum=extractor_kinds, schema={"uniqueItems": True},
                              description="The streams to train, each a registered extractor.")
    length: int = knob(10, ge=1, le=64, title="Stack length L", section="Data",
                       description="Frames per sample: a flow stream sees L flow fields (2L channels), rgb the "
                                   "middle frame.")
    size: int = knob(112, ge=16, le=1024, title="Sample size", section="Data",
                     description="Samples are size x size pixels.")
    flow_method: str = knob("dis_fast", enum=_flow_methods, title="Optical flow method", section="Data",
                            description="OpenCV algorithm of the flow stream.")
    split: int | None = knob(None, ge=1, le=3, title="UCF split", section="Data",
                             description="Which of the dataset's three train/test splits to train on (UCF-101's "
                                         "protocol; ingest records the splits it finds); empty: the manifest's own. "
                                         "`essp train --all-splits` trains all three and reports their mean.")
    val_fraction: float | None = knob(None, gt=0, le=MAX_VAL_FRACTION, title="Validation fraction", section="Data",
                                      description="Share of each class's training groups held out as the validation "
                                                  "split (scored after every epoch, what the learned fusions are "
                                                  "fitted on); empty: the manifest's own (0.1 if it has none). "
                                                  "Another value writes a new manifest version.")
    # -- Model
    rgb_arch: str = knob("resnet18", enum=_architectures, title="RGB architecture", section="Model",
                         description="Network of the rgb (spatial) stream.")
    flow_arch: str = knob("resnet18", enum=_architectures, title="Flow architecture", section="Model",
                          description="Network of the flow (temporal) stream.")
    framediff_arch: str = knob("resnet18", enum=_architectures, title="Frame-difference architecture",
                               section="Model", description="Network of the framediff stream (when it is among "
                                                            "the streams).")
    dropout: dict[str, Annotated[float, Field(ge=0, lt=1)]] = knob(
        default_factory=dict, title="Dropout", section="Model",
        description="Per stream, the dropout before the classifier, e.g. {\"rgb\": 0.9}; a stream not named: its "
                    "architecture's default.")
    pretrained: dict[str, Annotated[str, Field(min_length=1)]] = knob(
        default_factory=dict, title="Pretrained weights", section="Model",
        description="Per stream, weights to start from (torchvision state_dict or an ESSP checkpoint): an s3:// URI "
                    "in the models bucket or a run's checkpoints, or a file under ESSP_PRETRAINED_DIRS, e.g. "
                    "{\"rgb\": \"s3://essp-models/resnet18-imagenet.pt\"}.")
    # -- Training (besides OptimParams)
    samples_per_epoch: int | None = knob(None, ge=1, le=MAX_SAMPLES_PER_EPOCH, title="Samples per epoch",
                                         section="Training",
                                         description="Samples drawn per epoch (class, then video, then offset); "
                                                     "empty: the number of training videos.")
    early_stop_patience: int = knob(0, ge=0, le=1000, title="Early stopping patience", section="Training",
                                    description="Stop the run once no stream's validation loss has improved for this "
                                                "many epochs; 0: train every epoch.")
    # -- Workers
    trainer_procs: int = knob(1, ge=1, le=64, title="Processes per trainer", section="Workers",
                              description="DistributedDataParallel processes of each stream's trainer (one per GPU).")
    allocation: str = knob("static", enum=lambda: ALLOCATIONS, title="Trainer slot allocation", section="Workers",
                           description="static: every stream keeps trainer_procs processes; validation_loss: between "
                                       "epochs the run's trainer_procs x streams slots move to the streams whose "
                                       "validation loss still falls fastest (the paper's §3.4), each keeping at "
                                       "least allocation_min.")
    allocation_min: int = knob(1, ge=1, le=64, title="Slots a stream keeps", section="Workers",
                               description="The fewest trainer processes the validation_loss allocation leaves a "
                                           "stream (at most trainer_procs).")
    replicas: dict[str, Annotated[int, Field(ge=0, le=256)]] = knob(
        default_factory=lambda: dict(DEFAULT_REPLICAS), title="Worker replicas", section="Workers",
        description="Resident data workers to run per kind (decode and each extractor); the ensure step scales "
                    "each kind to its count (processes locally, Deployments in Kubernetes).")
    stop_data_workers: bool = knob(False, title="Stop data workers at the end", section="Workers",
                                   description="Scale the shared decode/extract workers to 0 when the run ends "
                                               "(they are shared by runs: leave off when other runs train).")
    max_inflight: int = knob(64, ge=1, le=4096, title="Samples in flight", section="Workers",
                             description="Back-pressure bound of the run in Redis (its payloads, at most "
                                         f"{MAX_INFLIGHT_GIB} GiB in all with the stack size and length).")
    epoch_timeout_s: float = knob(1800, gt=0, title="Epoch timeout (s)", section="Workers",
                                  description="How long to wait for one epoch of every stream (not counted while "
                                              "paused).")
    # -- Evaluation
    snippets: int = knob(DEFAULT_SNIPPETS, ge=1, le=250, title="Snippets per test video", section="Evaluation",
                         description="Evenly spaced snippets scored per video.")
    val_snippets: int = knob(5, ge=1, le=50, title="Snippets per validation video", section="Evaluation",
                             description="Evenly spaced snippets of each validation video that every trainer scores "
                                         "after each epoch (validation loss, top-1, mean class accuracy).")
    score_checkpoint: str = knob("last", enum=lambda: SCORE_CHECKPOINTS, title="Checkpoint scored",
                                 section="Evaluation",
                                 description="Which checkpoint of each stream scores the test videos: the last "
                                             "epoch's, or the one of its best validation loss.")
    fusion: str = knob("average", enum=FUSIONS.names, title="Fusion", section="Evaluation",
                       description="The fusion registered with the model; every strategy is scored side by side in "
                                   "the report.")
    fusion_weights: dict[str, Annotated[float, Field(ge=0)]] | None = knob(
        None, title="Fusion weights", section="Evaluation",
        description="Per-stream weights of the weighted fusion, one for each stream of the run, e.g. "
                    "{\"rgb\": 1, \"flow\": 1.5}.")
    registry: str | None = knob(None, pattern=NAME_PATTERN, title="Model registry", section="Evaluation",
                                description="Registry name; empty: the dataset's name.")
    promote_metric: str = knob("top1", enum=lambda: PROMOTION_METRICS, title="Promotion metric", section="Evaluation",
                               description="The model is promoted to production only if it beats production on "
                                           "this metric.")
    # -- Run
    preset: str | None = knob(None, enum=preset_names, title="Recipe preset", section="Run",
                              description="A named training recipe (docs/training.md): it fills the params left at "
                                          "their defaults, e.g. paper-temporal-resnet50 (needs pretrained weights).")
    run: str | None = knob(None, pattern=RUN_ID_PATTERN.pattern, title="Run id", section="Run",
                           description="ESSP run id; empty: derived from the DAG run. Reusing an id resumes that run.")

    @field_validator("run")
    @classmethod
    def _run_id(cls, run: str | None) -> str | None:
        return None if run is None else check_run_id(run)

    @model_validator(mode="after")
    def _checks(self) -> RunParams:
        kinds = extractor_kinds()
        bad = [s for s in self.streams if s not in kinds]
        if bad:
            raise ValueError(f"streams: {', '.join(map(repr, bad))} not a registered extractor ({', '.join(kinds)})")
        if len(set(self.streams)) != len(self.streams):
            raise ValueError(f"streams: each stream once, got {self.streams}")
        for name, value in (("flow_method", self.flow_method), ("fusion", self.fusion),
                            ("promote_metric", self.promote_metric), ("score_checkpoint", self.score_checkpoint),
                            ("allocation", self.allocation)):
            allowed = {"flow_method": _flow_methods, "fusion": FUSIONS.names,
                       "promote_metric": lambda: PROMOTION_METRICS,
                       "score_checkpoint": lambda: SCORE_CHECKPOINTS, "allocation": lambda: ALLOCATIONS}[name]()
            if value not in allowed:
                raise ValueError(f"{name}: {value!r} is not one of {', '.join(allowed)}")
        for stream in self.streams:
            arch = self.stream(stream).arch
            if arch not in ARCHITECTURES:
                raise ValueError(f"{stream}_arch: {arch!r} is not one of {', '.join(ARCHITECTURES)}")
            try:
                create_extractor(stream, self.stream(stream).options)
            except (ValueError, EsspError) as exc:
                raise ValueError(f"streams.{stream}: {exc}") from None
        for name in ("dropout",):
            others = sorted(set(getattr(self, name)) - set(self.streams))
            if others:
                raise ValueError(f"{name}: names stream(s) {', '.join(others)} that the run does not train "
                                 f"({', '.join(self.streams)})")
        if self.preset is not None and self.preset not in preset_names():
            raise ValueError(f"preset: {self.preset!r} is not one of {', '.join(preset_names())}")
        unknown = sorted(set(self.pretrained) - set(self.streams))
        if unknown:
            raise ValueError(f"pretrained: names stream(s) {', '.join(unknown)} that the run does not train "
                             f"({', '.join(self.streams)})")
        self._check_fusion_weights()
        self._check_allocation()
        self._check_replicas()
        self._check_inflight_bytes()
        self._check_sample_bytes()
        return self

    def sample_bytes(self) -> int:
        """What one sample takes at its largest: its L+1 decoded frames of size x size in colour (the decode
        worker) and its 2L flow planes in float32 (the flow extractor's fields, the trainer's input)."""
        pixels = self.size * self.size
        return (self.length + 1) * 3 * pixels + self.length * 2 * 4 * pixels

    def _check_sample_bytes(self) -> None:
        if self.sample_bytes() > MAX_SAMPLE_MIB * 2**20:
            raise ValueError(f"size, length: one sample of {self.size}x{self.size}, L={self.length} takes "
                             f"{self.sample_bytes() / 2**20:.0f} MiB (L+1 frames in colour and 2L float32 flow planes; "
                             f"at most {MAX_SAMPLE_MIB} MiB): lower size or length")

    def inflight_bytes(self) -> int:
        """An upper bound of the run's payloads in Redis at once: ``max_inflight`` samples, each its decoded
        frames (L+1 frames of size x size, in colour at most) and one feature per stream (at most two bytes
        per pixel per flow field: L x 2 x size x size)."""
        pixels = self.size * self.size
        planes = sum(4 if s == "flow_bi" else 2 for s in self.streams)  # flow_bi: forward and backward stacks
        return self.max_inflight * ((self.length + 1) * 3 * pixels + planes * self.length * pixels)

    def _check_inflight_bytes(self) -> None:
        limit = MAX_INFLIGHT_GIB * 2**30
        if self.inflight_bytes() > limit:
            raise ValueError(f"max_inflight, size, length: {self.max_inflight} samples of {self.size}x{self.size}, "
                             f"L={self.length}, {len(self.streams)} stream(s) can hold "
                             f"{self.inflight_bytes() / 2**30:.1f} GiB in Redis at once (at most {MAX_INFLIGHT_GIB} "
                             "GiB): lower max_inflight, size or length")

    def _check_fusion_weights(self) -> None:
        if self.fusion == "weighted" and not self.fusion_weights:
            raise ValueError("fusion_weights: the weighted fusion needs a weight per stream")
        if self.fusion_weights is None:
            return
        unknown = sorted(set(self.fusion_weights) - set(self.streams))
        missing = sorted(set(self.streams) - set(self.fusion_weights))
        if unknown or missing:
            raise ValueError(f"fusion_weights: must name each stream exactly once (unknown: {unknown or 'none'}, "
                             f"missing: {missing or 'none'})")
        if sum(self.fusion_weights.values()) <= 0:
            raise ValueError("fusion_weights: weights must be >= 0 and not all zero")

    def _check_allocation(self) -> None:
        if self.allocation_min > self.trainer_procs:
            raise ValueError(f"allocation_min: {self.allocation_min} is more than trainer_procs "
                             f"({self.trainer_procs}): a stream cannot keep more slots than each has to start with")
        if self.allocation != "static" and (len(self.streams) < 2 or self.allocation_min == self.trainer_procs):
            raise ValueError(f"allocation: {self.allocation} has no slot to move with {len(self.streams)} stream(s) of "
                             f"trainer_procs {self.trainer_procs}, each keeping allocation_min {self.allocation_min}: "
                             "raise trainer_procs (or train two streams)")

    def _check_replicas(self) -> None:
        kinds = data_kinds()
        bad = sorted(set(self.replicas) - set(kinds))
        if bad:
            raise ValueError(f"replicas: {', '.join(bad)} not a worker kind ({', '.join(kinds)})")
        for kind in ["decode", *self.streams]:
            if self.workers()[kind] < 1:
                raise ValueError(f"replicas.{kind}: the run needs at least one {kind} worker "
                                 f"(got {self.workers()[kind]})")
        total = sum(self.workers().values())
        if total > MAX_WORKERS:
            counts = ", ".join(f"{kind} {n}" for kind, n in self.workers().items() if n)
            raise ValueError(f"replicas: {total} data workers in all ({counts}), more than {MAX_WORKERS}: each is a "
                             "process or a pod of its own; lower the counts")

    # -- what the rest of ESSP reads off the params --------------------------------------------------
    def stream(self, name: str) -> StreamSpec:
        """The stream ``name`` of this run (a stream without an ``<name>_arch`` param trains resnet18; the flow
        kinds compute their fields with ``flow_method``)."""
        options = {"method": self.flow_method} if name in FLOW_KINDS else {}
        return StreamSpec(name, str(getattr(self, f"{name}_arch", "resnet18")), options, self.pretrained.get(name))

    def features(self) -> dict[str, dict[str, Any]]:
        """What each decode job asks of the extractors: {stream: options}."""
        return {name: dict(self.stream(name).options) for name in self.streams}

    def train_params(self, stream: str) -> TrainParams:
        spec = self.stream(stream)
        shared = {name: getattr(self, name) for name in OptimParams.model_fields}
        return TrainParams(**shared, arch=spec.arch, pretrained=spec.pretrained, dropout=self.dropout.get(stream))

    def workers(self) -> dict[str, int]:
        """Replicas per data-worker kind: the defaults (one for a stream of a kind without a default) with the
        param's counts on top."""
        return {**DEFAULT_REPLICAS, **{s: 1 for s in self.streams if s not in DEFAULT_REPLICAS}, **self.replicas}

    def run_id(self) -> str:
        if self.run is None:
            raise RunParamsError("run: a run needs an id (RunParams.for_dag_run or --run)")
        return self.run


def parse_params(values: dict[str, Any]) -> RunParams:
    """RunParams from user values (the DAG's params, `essp train`'s options, a stored spec), with errors
    that name each bad param."""
    try:
        return RunParams.model_validate(apply_preset(upgrade_stored(values), _defaults()))
    except PresetError as exc:
        raise RunParamsError(f"bad training parameters: {exc}") from None
    except ValidationError as exc:
        raise RunParamsError(f"bad training parameters: {describe_validation(exc)}") from None


def _defaults() -> dict[str, Any]:
    """Each RunParams param's default (what a preset may fill in)."""
    return {name: field.get_default(call_default_factory=True) for name, field in RunParams.model_fields.items()}


def upgrade_stored(values: dict[str, Any]) -> dict[str, Any]:
    """A run's params as ESSP 0.1 stored them (``manifest``, ``streams`` as {name: {arch, options,
    pretrained}}) in today's flat form; today's values pass through unchanged."""
    values = dict(values)
    if "manifest" in values and "dataset" not in values:
        values["dataset"] = values.pop("manifest")
    streams = values.get("streams")
    if isinstance(streams, dict):
        values["streams"] = list(streams)
        pretrained = dict(values.get("pretrained") or {})
        for name, stream in streams.items():
            stream = dict(stream or {})
            if "arch" in stream:
                values.setdefault(f"{name}_arch", stream["arch"])
            if name == "flow" and (stream.get("options") or {}).get("method"):
                values.setdefault("flow_method", stream["options"]["method"])
            if stream.get("pretrained"):
                pretrained.setdefault(name, stream["pretrained"])
        values["pretrained"] = pretrained
    return values


class NightlyParams(FormParams):
    """The `essp_nightly_retrain` DAG's params: which production model to fine-tune, and how."""

    model_config = ConfigDict(json_schema_extra=_keyed_schema({"replicas": data_kinds}))

    registry: str = knob("synth-demo", pattern=NAME_PATTERN, title="Model registry", section="Model",
                         description="The registry whose production model is fine-tuned; its dataset is the one "
                                     "checked for new videos.")
    epochs: int = knob(2, ge=1, le=1000, title="Fine-tuning epochs", section="Training",
                       description="Epochs of the fine-tuning run.")
    lr_scale: float = knob(0.1, gt=0, le=1, title="Learning-rate scale", section="Training",
                           description="Fine-tuning starts at production's learning rate times this.")
    samples_per_epoch: int | None = knob(None, ge=1, le=MAX_SAMPLES_PER_EPOCH, title="Samples per epoch",
                                         section="Training",
                                         description="Empty: production's setting.")
    replicas: dict[str, Annotated[int, Field(ge=0, le=256)]] = knob(
        default_factory=lambda: dict(DEFAULT_REPLICAS), title="Worker replicas", section="Workers",
        description="Resident data workers to run per kind while fine-tuning.")
    stop_data_workers: bool = knob(False, title="Stop data workers at the end", section="Workers",
                                   description="Scale the shared decode/extract workers to 0 when the run ends.")


class PredictParams(FormParams):
    """The `essp_predict` DAG's params: which videos, which model, how many classes back."""

    prefix: str = knob("incoming/", min_length=1, title="Videos", section="Data",
                       description="s3://bucket/prefix/, or a key prefix in the videos bucket.")
    registry: str | None = knob(None, pattern=NAME_PATTERN, title="Model registry", section="Model",
                                description="Empty: the one registry with a production model. With several, "
                                            "name one: the run fails at once, naming them.")
    version: int | None = knob(None, ge=1, title="Model version", section="Model", description="Empty: production.")
    fusion: str | None = knob(None, enum=FUSIONS.names, title="Fusion", section="Model",
                              description="Empty: the registered model's fusion.")
    limit: int | None = knob(None, ge=1, title="At most this many videos", section="Data",
                             description="Empty: every video under the prefix.")
    top: int = knob(3, ge=1, le=100, title="Top classes per video", section="Evaluation",
                    description="Classes listed per video, best first.")

    @field_validator("fusion")
    @classmethod
    def _known_fusion(cls, fusion: str | None) -> str | None:
        if fusion is not None:
            FUSIONS.get(fusion)
        return fusion


class ControlParams(FormParams):
    """The `essp_control` DAG's params: a command for one run."""

    run: str = knob(pattern=RUN_ID_PATTERN.pattern, title="Run id", section="Run",
                    description="The ESSP run (shown by essp_train's validate_params and on its report tab).")
    command: Literal["pause", "resume", "stop"] = knob("pause", title="Command", section="Run",
                                                       description="pause: hold its jobs and the epoch timeout; "
                                                                   "resume: go on; stop: trainers checkpoint and end.")
