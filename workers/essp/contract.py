"""The wire contract of ESSP: every Kafka topic name, Redis key pattern and message schema.

Nothing else in the project spells a topic or a key: workers, operators, DAGs and tests all go
through :class:`Topics`, :class:`RedisKeys` and the message classes here. Messages are JSON objects
with a ``kind`` and a schema version ``v``; :func:`decode` validates what it reads and raises
:class:`~essp.errors.MalformedMessage` with a reason, which consumers turn into a dead letter.
"""

from __future__ import annotations

import base64
import json
import re
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from essp.errors import MalformedMessage

SCHEMA_VERSION = 1
# Run ids become part of topic names and Redis keys: keep them to a safe alphabet.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
STREAM_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


def check_run_id(run: str) -> str:
    if not RUN_ID_PATTERN.match(run):
        raise ValueError(
            f"run id {run!r} is not valid: use 1-64 letters, digits, '_' or '-', starting with a "
            "letter or digit (it becomes part of Kafka topic names and Redis keys)"
        )
    return run


def _epoch_part(epoch: int) -> str:
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch {epoch!r} is not valid: an integer >= 0")
    return f"e{epoch:04d}"


def _check_stream(stream: str) -> str:
    if not STREAM_PATTERN.match(stream):
        raise ValueError(f"stream name {stream!r} is not valid: lower-case letters, digits and '_'")
    return stream


@dataclass(frozen=True)
class Topics:
    """Kafka topic names. Per-run topics carry the run id; control and events are shared."""

    prefix: str = "essp"

    @property
    def control(self) -> str:
        """start / pause / resume / stop / epoch commands to every worker."""
        return f"{self.prefix}.control"

    @property
    def events(self) -> str:
        """Heartbeats, counters, epoch_done and error events from every worker."""
        return f"{self.prefix}.events"

    @property
    def dead(self) -> str:
        """Dead letters that belong to no run (a message too broken to tell its run)."""
        return f"{self.prefix}.dead"

    @property
    def smoke(self) -> str:
        """Round-trip checks of the `essp_smoke` DAG."""
        return f"{self.prefix}.smoke"

    # The data plane's topics are per epoch (``<prefix>.<run>.e<epoch>.<leaf>``): an epoch's jobs and notices
    # live in topics of their own, which the planner deletes two epochs later, so that what the broker
    # keeps (and reads through: a fetch lists a partition's stored batches) stays the size of one epoch
    # however long the run is. Dead letters stay per run.
    def decode(self, run: str, epoch: int) -> str:
        return f"{self.prefix}.{check_run_id(run)}.{_epoch_part(epoch)}.decode"

    def frames(self, run: str, epoch: int) -> str:
        return f"{self.prefix}.{check_run_id(run)}.{_epoch_part(epoch)}.frames"

    def ready(self, run: str, stream: str, epoch: int) -> str:
        return f"{self.prefix}.{check_run_id(run)}.{_epoch_part(epoch)}.ready.{_check_stream(stream)}"

    def run_dead(self, run: str) -> str:
        return f"{self.prefix}.{check_run_id(run)}.dead"

    def decode_pattern(self, run: str | None = None) -> str:
        """Regex of the decode topics of one run, or of every run (resident workers serve all runs)."""
        return self._pattern("decode", run)

    def frames_pattern(self, run: str | None = None) -> str:
        return self._pattern("frames", run)

    def ready_pattern(self, run: str, stream: str) -> str:
        """Regex of one stream's ready topics of every epoch of a run, and of the run's dead letters: what
        one consumer of the stream reads."""
        leaf = rf"(e[0-9]{{4,}}\.ready\.{re.escape(_check_stream(stream))}|dead)"
        return rf"^{re.escape(self.prefix)}\.{re.escape(check_run_id(run))}\.{leaf}$"

    def _pattern(self, leaf: str, run: str | None) -> str:
        middle = re.escape(check_run_id(run)) if run else r"[A-Za-z0-9][A-Za-z0-9_-]*"
        return rf"^{re.escape(self.prefix)}\.{middle}\.e[0-9]{{4,}}\.{leaf}$"

    def run_of(self, topic: str) -> str:
        """The run id inside a per-run topic name."""
        head = self.prefix + "."
        if not topic.startswith(head) or topic.count(".") < self.prefix.count(".") + 2:
            raise ValueError(f"topic {topic!r} is not a per-run topic under prefix {self.prefix!r}")
        return check_run_id(topic[len(head):].split(".", 1)[0])

    def epoch_of(self, topic: str) -> int | None:
        """The epoch of a per-epoch topic, None for a per-run one (dead letters)."""
        self.run_of(topic)
        part = topic[len(self.prefix) + 1:].split(".")[1]
        return int(part[1:]) if re.fullmatch(r"e[0-9]{4,}", part) else None

    def is_run_topic(self, topic: str, run: str) -> bool:
        """Whether ``topic`` is one of the run's own topics (any epoch, or its dead letters)."""
        return topic.startswith(f"{self.prefix}.{check_run_id(run)}.")

    def epoch_topics(self, run: str, epoch: int, streams: list[str]) -> list[str]:
        """The topics of one epoch of a run: decode jobs, frames notices, one ready topic per stream."""
        return [self.decode(run, epoch), self.frames(run, epoch), *(self.ready(run, s, epoch) for s in streams)]

    def run_topics(self, run: str, streams: list[str], epoch: int) -> list[str]:
        """The topics an epoch of a run uses: its own (:meth:`epoch_topics`) and the run's dead letters."""
        return [*self.epoch_topics(run, epoch, streams), self.run_dead(run)]

    def shared(self) -> list[str]:
        """Topics that exist independently of any run (created by `essp infra init`)."""
        return [self.control, self.events, self.dead, self.smoke]


@dataclass(frozen=True)
class RedisKeys:
    """Redis key patterns. Payload keys are idempotent per sample id: a redo overwrites."""

    prefix: str = "essp"

    def frames(self, run: str, sample_id: str) -> str:
        return f"{self.prefix}:{check_run_id(run)}:frames:{sample_id}"

    def feature(self, run: str, extractor: str, sample_id: str) -> str:
        return f"{self.prefix}:{check_run_id(run)}:feat:{extractor}:{sample_id}"

    def sample_state(self, run: str, sample_id: str) -> str:
        """Per-stream progress of one sample (to extract / extracted / consumed); see essp.dataplane.payloads."""
        return f"{self.prefix}:{check_run_id(run)}:state:{sample_id}"

    def inflight(self, run: str) -> str:
        """Samples of the run between decode and consumption: the back-pressure set (sorted by time)."""
        return f"{self.prefix}:{check_run_id(run)}:inflight"

    def trainer(self, run: str, stream: str) -> str:
        """The state of a run's trainer for one stream (ready / training / epoch_done / stopped / failed),
        with its last finished epoch: what the master waits on."""
        return f"{self.prefix}:{check_run_id(run)}:trainer:{_check_stream(stream)}"

    def epoch_request(self, run: str) -> str:
        """The epoch the master asked the run's trainers to train, with its sample count."""
        return f"{self.prefix}:{check_run_id(run)}:epochreq"

    def epoch_planned(self, run: str, epoch: int, token: str) -> str:
        """Set (NX) by the one caller with ``token`` (a DAG run) that plans ``epoch``; see plan_epoch_once."""
        return f"{self.prefix}:{check_run_id(run)}:planned:{int(epoch)}:{token}"

    def pauses(self, run: str) -> str:
        """Hash of the run's paused time (``paused_s``, and ``since`` while paused), kept by whoever sees
        the run's state: what an epoch's timeout leaves out, across restarts of whoever waits."""
        return f"{self.prefix}:{check_run_id(run)}:pauses"

    def run_state(self, run: str) -> str:
        """running / paused / stopped, set by control commands and read by every worker."""
        return f"{self.prefix}:{check_run_id(run)}:runstate"

    def scoring(self, run: str) -> str:
        """Hash split -> JSON ``{scored, total, finished, ...}``: how far the run's scoring has come (for the UI)."""
        return f"{self.prefix}:{check_run_id(run)}:scoring"

    def decode_attempts(self, run: str) -> str:
        """Hash video URI -> decodes started and not finished (a crash or a hang), for poison videos."""
        return f"{self.prefix}:{check_run_id(run)}:attempts"

    def val_planned(self, run: str, epoch: int, attempt: str) -> str:
        """Set (NX) by the first trainer of a run that publishes ``epoch``'s validation snippets for the epoch
        request ``attempt``; see essp.training.validation."""
        return f"{self.prefix}:{check_run_id(run)}:valplanned:{int(epoch)}:{attempt}"

    def quarantine(self, run: str) -> str:
        """Hash video URI -> reason, for videos that failed to decode in this run."""
        return f"{self.prefix}:{check_run_id(run)}:quarantine"

    def worker_state(self, run: str, worker_id: str) -> str:
        return f"{self.prefix}:{check_run_id(run)}:worker:{worker_id}"

    def worker(self, worker_id: str) -> str:
        """The last event of a live worker (expires when its heartbeats stop)."""
        return f"{self.prefix}:worker:{worker_id}"

    def workers(self) -> str:
        """Pattern of every live worker's key."""
        return f"{self.prefix}:worker:*"

    def smoke(self, token: str) -> str:
        return f"{self.prefix}:smoke:{token}"


class Message(BaseModel):
    """Base of every message on a Kafka topic."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    v: Literal[1] = SCHEMA_VERSION
    sent_at: float = Field(default_factory=time.time)


class DecodeJob(Message):
    """Decode `length + 1` frames of `video` from `offset` for one planned sample.

    ``features`` names the extractors (= streams) the sample feeds, with their options, e.g.
    ``{"rgb": {}, "flow": {"method": "dis_fast"}}``: extractor workers pick what names their kind,
    and the sample counts as in flight until every one of those streams has been consumed.
    """

    kind: Literal["decode_job"] = "decode_job"
    run: str
    epoch: int = Field(ge=0)
    sample_id: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")
    video: str = Field(min_length=1, description="s3://bucket/key of the video")
    label: int = Field(ge=0)
    offset: int = Field(ge=0, description="index of the first frame")
    length: int = Field(ge=1, description="stack length L; L+1 frames are decoded")
    height: int = Field(gt=0)
    width: int = Field(gt=0)
    video_frames: int | None = Field(None, gt=0, description="frame count of the video (from the manifest)")
    features: dict[str, dict[str, Any]] = Field(default_factory=dict)
    max_inflight: int = Field(64, ge=1, description="bound on samples of this run in flight")

    @model_validator(mode="after")
    def _checks(self) -> DecodeJob:
        check_run_id(self.run)
        for name in self.features:
            _check_stream(name)
        if self.video_frames is not None and self.offset + self.length + 1 > self.video_frames:
            raise ValueError(f"offset {self.offset} + {self.length + 1} frames runs past the video's "
                             f"{self.video_frames} frames")
        return self


# Frame formats a decode worker stores: "rgb24" (L+1, H, W, 3) or "gray" (L+1, H, W), uint8.
FRAME_FORMATS = ("rgb24", "gray")
# The most samples one chunk message carries (see essp.dataplane.plan.chunk_size for the default).
MAX_CHUNK = 256


def _one_epoch(jobs: list[DecodeJob], what: str) -> None:
    first = jobs[0]
    for job in jobs[1:]:
        if (job.run, job.epoch) != (first.run, first.epoch):
            raise ValueError(f"a {what} holds samples of one epoch of one run: {job.sample_id} is of run "
                             f"{job.run} epoch {job.epoch}, {first.sample_id} of run {first.run} epoch {first.epoch}")
    ids = [job.sample_id for job in jobs]
    if len(set(ids)) != len(ids):
        raise ValueError(f"a {what} names each sample once; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")


class _Chunk(Message):
    """Samples of one epoch of one run that travel together: the protocol pays per chunk (one message,
    one commit), while Redis keys, progress and redos stay per sample."""

    jobs: list[DecodeJob] = Field(min_length=1, max_length=MAX_CHUNK)

    @model_validator(mode="after")
    def _same_epoch(self) -> _Chunk:
        _one_epoch(self.jobs, self.kind)  # type: ignore[attr-defined]
        return self

    @property
    def run(self) -> str:
        return self.jobs[0].run

    @property
    def epoch(self) -> int:
        return self.jobs[0].epoch

    def sample_ids(self) -> list[str]:
        return [job.sample_id for job in self.jobs]


class DecodeChunk(_Chunk):
    """Decode jobs of consecutive samples of one epoch (the planner's chunk, or the samples of a redo)."""

    kind: Literal["decode_chunk"] = "decode_chunk"


class FramesReady(_Chunk):
    """The decoded frames of each job are in Redis (``RedisKeys.frames``; self-describing, see
    essp.dataplane.payloads). ``pix_fmt``: of the stack stored, "gray" also when a few colour frames go
    with the grey stack (essp.dataplane.extractors.frames_layout)."""

    kind: Literal["frames_ready"] = "frames_ready"
    pix_fmt: Literal["rgb24", "gray"] = "rgb24"


class FeatureReady(_Chunk):
    """The feature of each job computed by ``extractor`` is in Redis (``RedisKeys.feature``), for ``stream``."""

    kind: Literal["feature_ready"] = "feature_ready"
    extractor: str
    stream: str


class ControlCommand(Message):
    kind: Literal["control"] = "control"
    command: Literal["start", "pause", "resume", "stop", "epoch"]
    run: str | None = None
    epoch: int | None = Field(None, ge=0)
    target: str = Field("*", description="worker kind, worker id, or '*' for every worker")


class WorkerEvent(Message):
    kind: Literal["worker_event"] = "worker_event"
    event: Literal["started", "heartbeat", "epoch_done", "error", "stopped"]
    worker_id: str
    worker_kind: str
    run: str | None = None
    epoch: int | None = None
    counters: dict[str, float] = Field(default_factory=dict)
    detail: str | None = None


class DeadLetter(Message):
    """A message or a job that could not be processed, with the reason and the original bytes."""

    kind: Literal["dead_letter"] = "dead_letter"
    reason: str
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    run: str | None = None
    epoch: int | None = None
    sample_id: str | None = None
    video: str | None = None
    stream: str | None = Field(None, description="the one stream that lost the sample; None: every stream")
    payload_b64: str | None = None

    def payload(self) -> bytes | None:
        return base64.b64decode(self.payload_b64) if self.payload_b64 is not None else None


class SmokePing(Message):
    kind: Literal["smoke_ping"] = "smoke_ping"
    token: str


# -- the trainers' state (Redis): what the master waits on ------------------------------------------
TRAINER_FAMILY = "trainer"  # the control target that reaches every trainer; trainers' worker kind is trainer-<stream>
TRAINER_STATE_TTL_S = 7 * 24 * 3600
TrainerStatus = Literal["ready", "training", "epoch_done", "stopped", "failed"]


class TrainerState(BaseModel):
    """What a run's trainer of one stream last recorded under :meth:`RedisKeys.trainer`."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    status: TrainerStatus
    epoch_done: int = Field(-1, ge=-1, description="the last finished epoch; -1: none yet")
    epoch: int | None = Field(None, description="the epoch being trained (status training)")
    iteration: int = 0
    worker: str | None = None
    updated_at: float | None = None
    stats: dict[str, Any] = Field(default_factory=dict, description="the last finished epoch's figures")
    checkpoint: str | None = None
    resumed_from: str | None = None
    detail: str | None = None

    def finished(self, epoch: int) -> bool:
        return self.epoch_done >= epoch

    @classmethod
    def parse(cls, raw: bytes | str | None) -> TrainerState | None:
        """The state as stored in Redis; None when there is none (or one this version cannot read: the
        trainer rewrites it at its next step)."""
        if not raw:
            return None
        try:
            return cls.model_validate_json(raw)
        except ValidationError:
            return None


EpochStatus = Literal["done", "waiting", "paused", "failed", "stalled", "stopped", "timeout"]


@dataclass(frozen=True)
class EpochProgress:
    """Where one epoch of a run stands over its streams' trainers (see :func:`epoch_progress`)."""

    status: EpochStatus
    run: str
    epoch: int
    done: dict[str, dict[str, Any]]  # stream -> the figures of the streams that finished the epoch
    waiting: list[str]
    stream: str | None = None  # the stream that failed or stalled
    detail: str = ""

    @property
    def over(self) -> bool:
        """True when nothing more will happen to this epoch without someone acting (done or an end)."""
        return self.status not in ("waiting", "paused")


def epoch_progress(run: str, epoch: int, states: dict[str, TrainerState | None], *, run_state: str = "running",
                   gone: dict[str, str] | None = None, overdue_s: float | None = None) -> EpochProgress:
    """Whether ``epoch`` of ``run`` is done, still going, paused, or ended otherwise, from its trainers' states.

    The one judgement the epoch trigger, the train operator, the pipeline and the UI share. ``states`` maps
    each stream to its trainer's state (None: none recorded yet); ``run_state`` is the run's control state
    (running / paused / stopped); ``gone`` maps streams whose trainer process is known to have exited to
    what is known of it (the end of its log); ``overdue_s`` is the caller's timeout when its clock says the
    epoch is overdue (the caller does not count paused time). In order: a stopped run, a failed trainer, a
    trainer gone before finishing, every stream done, paused, overdue, else waiting."""
    done = {s: dict(st.stats) for s, st in states.items() if st is not None and st.finished(epoch)}
    waiting = [s for s in states if s not in done]

    def make(status: EpochStatus, stream: str | None = None, detail: str = "") -> EpochProgress:
        return EpochProgress(status, run, epoch, done, waiting, stream, detail)

    if run_state == "stopped":
        return make("stopped", detail=f"run {run} was stopped (essp control stop); the trainers checkpointed where "
                                      "they were; trigger a new run to resume")
    for stream, state in states.items():
        if state is not None and state.status == "failed":
            return make("failed", stream, f"the {stream} trainer failed in epoch {epoch}: {state.detail}")
    for stream in waiting:
        if stream in (gone or {}):
            return make("stalled", stream, f"the {stream} trainer process of run {run} exited before finishing "
                                           f"epoch {epoch}; its log ends:\n{(gone or {})[stream]}")
    if not waiting:
        return make("done")
    if run_state == "paused":
        return make("paused", detail=f"run {run} is paused (essp control resume)")
    if overdue_s is not None:
        return make("timeout", ",".join(waiting), f"epoch {epoch} of run {run} not finished by "
                                                  f"{', '.join(waiting)} after {overdue_s:.0f}s; is a trainer running "
                                                  "(`essp worker status`)?")
    return make("waiting")


AnyMessage = Annotated[
    DecodeJob | DecodeChunk | FramesReady | FeatureReady | ControlCommand | WorkerEvent | DeadLetter | SmokePing,
    Field(discriminator="kind"),
]
_ANY = TypeAdapter(AnyMessage)
KINDS: dict[str, type[Message]] = {
    cls.model_fields["kind"].default: cls
    for cls in (DecodeJob, DecodeChunk, FramesReady, FeatureReady, ControlCommand, WorkerEvent, DeadLetter,
                SmokePing)
}


def encode(message: Message) -> bytes:
    return message.model_dump_json().encode()


def decode(raw: bytes | None, topic: str, expected: tuple[type[Message], ...] = ()) -> Message:
    """Parse and validate one message read from ``topic``.

    ``expected`` limits the kinds accepted on that topic; a message of another kind is malformed
    there even if it is a valid message elsewhere.
    """
    if raw is None:
        raise MalformedMessage(topic, "empty message (no value)")
    try:
        data: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessage(topic, f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedMessage(topic, f"expected a JSON object, got {type(data).__name__}")
    kind, version = data.get("kind"), data.get("v")
    if kind not in KINDS:
        raise MalformedMessage(topic, f"unknown message kind {kind!r}")
    if version != SCHEMA_VERSION:
        raise MalformedMessage(topic, f"{kind} schema version {version!r} is not supported "
                                      f"(this worker reads v{SCHEMA_VERSION})")
    if expected and KINDS[kind] not in expected:
        names = ", ".join(cls.model_fields["kind"].default for cls in expected)
        raise MalformedMessage(topic, f"a {kind} message does not belong here (expected {names})")
    try:
        return _ANY.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'][1:]) or '<root>'}: {err['msg']}" for err in exc.errors()
        )
        raise MalformedMessage(topic, f"invalid {kind}: {problems}") from None
