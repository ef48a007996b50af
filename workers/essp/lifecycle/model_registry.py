"""The model registry: immutable, numbered versions of two-stream models (checkpoints per stream, the
fusion, metrics, the run and dataset they came from) and which version is in production.

Layout in the models bucket::

    registry/<name>/versions/000001.json     one immutable object per version (ModelVersion)
    registry/<name>/production.json          {"version": N, "promoted_at", "reason", "metric", "value", ...}
    registry/<name>/promotions/000001.json   one immutable object per promotion decision (append-only)

A version is promoted only when its metric is strictly better (greater) than production's, unless
forced; a rollback is a forced promotion. Refused promotions are kept in the history too.

Two runs may register and promote into one registry at once: every write is a compare-and-set
(:mod:`essp.lifecycle.cas`). A version number or a history entry is taken by creating its object only
if there is none (the loser takes the next number); production.json is replaced only if it is still the
version the decision was made on, else the promotion reads production again and decides again. No
update is lost: of two concurrent promotions the better one ends in production.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from typing import Any

from pydantic import BaseModel, Field, ValidationError, field_validator

from essp.clients.s3 import ObjectNotFound, ObjectStore, S3Uri, Versioned
from essp.errors import EsspError
from essp.settings import Settings

REGISTRY_PREFIX = "registry"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_VERSION_KEY = re.compile(r"/versions/(\d{6})\.json$")
_EVENT_KEY = re.compile(r"/promotions/(\d{6})\.json$")
RACES = 20  # how many times a write that lost a race is tried again on a fresh read


class ModelNotFound(ObjectNotFound):
    """The registry has no such version."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _finite(value: Any) -> Any:
    """The value with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


class ModelVersion(BaseModel):
    v: int = 1  # schema version of this document
    name: str
    version: int = Field(ge=1)
    run: str
    created_at: str  # UTC, ISO 8601
    streams: dict[str, str]  # stream -> checkpoint URI (s3://)
    fusion: dict[str, Any]  # {"strategy": ..., "weights": ..., optionally "state": s3:// URI of a fitted fuser}
    metrics: dict[str, Any]  # the selected strategy's metrics at top level; may hold "streams": {stream: {...}}
    params: dict[str, Any] = {}
    manifest: str | None = None  # dataset manifest URI
    class_names: list[str]

    @field_validator("streams")
    @classmethod
    def _checkpoints(cls, streams: dict[str, str]) -> dict[str, str]:
        if not streams:
            raise ValueError("a model needs at least one stream checkpoint")
        for stream, uri in streams.items():
            try:
                S3Uri.parse(uri)
            except ValueError as exc:
                raise ValueError(f"checkpoint of stream {stream!r}: {exc}") from None
        return streams

    @field_validator("fusion")
    @classmethod
    def _strategy(cls, fusion: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(fusion.get("strategy"), str) or not fusion["strategy"]:
            raise ValueError(f"fusion must name its \"strategy\" (got {fusion!r:.120})")
        return fusion

    @field_validator("metrics", "params", mode="before")
    @classmethod
    def _json_safe(cls, value: Any) -> Any:
        return _finite(value)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    def metric(self, metric: str) -> float:
        """The named metric as a float; an error naming metric and version if absent or not a number."""
        if metric not in self.metrics:
            have = ", ".join(k for k, v in self.metrics.items() if isinstance(v, int | float)) or "none"
            raise EsspError(f"model {self.ref} has no metric {metric!r} (numeric metrics: {have})")
        value = self.metrics[metric]
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise EsspError(f"metric {metric!r} of model {self.ref} is {value!r}, not a number")
        return float(value)


class Production(BaseModel):
    """The production.json pointer."""

    version: int = Field(ge=1)
    promoted_at: str
    reason: str
    metric: str | None = None
    value: float | None = None
    previous: int | None = None


class PromotionResult(BaseModel):
    """One promotion decision (also what promotions/NNNNNN.json holds)."""

    registry: str
    version: int  # the candidate
    promoted: bool
    forced: bool
    metric: str
    candidate_value: float | None
    incumbent: int | None  # production's version when the decision was made
    incumbent_value: float | None
    reason: str
    at: str = Field(default_factory=_now)


def _problems(exc: ValidationError) -> str:
    """A pydantic error as one line: each field and what is wrong with it."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'document'}: {e['msg'].removeprefix('Value error, ')}"
                     for e in exc.errors())


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise EsspError(f"model registry name {name!r} is not valid: use 1-64 letters, digits, '_' or '-', "
                        "starting with a letter or digit (it becomes part of S3 keys)")
    return name


class ModelRegistry:
    """Versions and the production pointer of one named model under ``s3://<bucket_models>/registry/<name>/``."""

    def __init__(self, settings: Settings, name: str = "default") -> None:
        self.settings = settings
        self.name = check_name(name)
        self.store = ObjectStore(settings)
        self.bucket = settings.bucket_models
        self.prefix = f"{REGISTRY_PREFIX}/{name}"

    def __repr__(self) -> str:
        return f"ModelRegistry({self.name!r} at s3://{self.bucket}/{self.prefix}/)"

    # keys -------------------------------------------------------------------------------------

    def _version_key(self, version: int) -> str:
        return f"{self.prefix}/versions/{version:06d}.json"

    def _production_key(self) -> str:
        return f"{self.prefix}/production.json"

    def uri(self, version: int) -> str:
        """The s3:// URI of a version's document."""
        return str(S3Uri(self.bucket, self._version_key(version)))

    def _numbers(self, pattern: re.Pattern[str], sub: str) -> list[int]:
        try:
            keys = list(self.store.list_keys(self.bucket, f"{self.prefix}/{sub}/"))
        except ObjectNotFound:  # no bucket yet: nothing registered
            return []
        return sorted(int(m.group(1)) for k in keys if (m := pattern.search(k)))

    def version_numbers(self) -> list[int]:
        """The registered version numbers, ascending (without reading the documents)."""
        return self._numbers(_VERSION_KEY, "versions")

    # versions ---------------------------------------------------------------------------------

    def register(self, *, run: str, streams: dict[str, str], fusion: dict[str, Any], metrics: dict[str, Any],
                 class_names: list[str], params: dict[str, Any] | None = None,
                 manifest: str | None = None) -> ModelVersion:
        """Store a new version (1 + the highest existing); versions are immutable, never overwritten: a
        number another registration took meanwhile is skipped (compare-and-set), never written over."""
        self.store.ensure_bucket(self.bucket)
        numbers = self.version_numbers()
        version = (numbers[-1] if numbers else 0) + 1
        for _ in range(RACES):
            try:
                model = ModelVersion(name=self.name, version=version, run=run, created_at=_now(), streams=streams,
                                     fusion=fusion, metrics=metrics, params=params or {}, manifest=manifest,
                                     class_names=class_names)
            except ValidationError as exc:
                raise EsspError(f"model {self.name}@{version} of run {run!r} is not valid: {_problems(exc)}") from None
            body = model.model_dump_json().encode()
            if self.store.put_if(self.bucket, self._version_key(version), body, etag=None) is not None:
                return model
            version += 1  # another registration took that number meanwhile
        raise EsspError(f"model registry {self.name!r}: run {run!r} lost {RACES} races for a version number at "
                        f"s3://{self.bucket}/{self.prefix}/versions/ (that many concurrent registrations?); "
                        "register again")

    def get(self, version: int) -> ModelVersion:
        """The stored version `version`."""
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise EsspError(f"model registry {self.name!r}: version must be an integer >= 1, got {version!r}")
        uri = self.uri(version)
        try:
            raw = self.store.get_bytes(self.bucket, self._version_key(version))
        except ObjectNotFound:
            have = self.version_numbers()
            hint = f"versions: {', '.join(map(str, have))}" if have else "nothing registered yet"
            raise ModelNotFound(f"model registry {self.name!r} has no version {version}: {uri} not found "
                                f"({hint})") from None
        try:
            model = ModelVersion.model_validate_json(raw)
        except ValidationError as exc:
            raise EsspError(f"model version {uri} is not a valid model version: {_problems(exc)}") from None
        if model.version != version or model.name != self.name:
            raise EsspError(f"model version {uri} says it is {model.ref}")
        return model

    def versions(self) -> list[ModelVersion]:
        """Every registered version, by version number."""
        return [self.get(v) for v in self.version_numbers()]

    def latest(self) -> ModelVersion | None:
        """The highest registered version, or None."""
        numbers = self.version_numbers()
        return self.get(numbers[-1]) if numbers else None

    # production -------------------------------------------------------------------------------

    def production_pointer(self) -> Production | None:
        """production.json (version, when and why it was promoted), or None before the first promotion."""
        return self._pointer(self.store.get_versioned(self.bucket, self._production_key()))

    def _pointer(self, found: Versioned | None) -> Production | None:
        if found is None:
            return None
        try:
            return Production.model_validate_json(found.data)
        except ValidationError as exc:
            raise EsspError(f"production pointer s3://{self.bucket}/{self._production_key()} is not valid: "
                            f"{_problems(exc)}") from None

    def production(self) -> ModelVersion | None:
        """The version in production, or None before the first promotion."""
        pointer = self.production_pointer()
        return None if pointer is None else self.get(pointer.version)

    def promote(self, version: int, *, metric: str = "top1", force: bool = False,
                reason: str | None = None) -> PromotionResult:
        """Make `version` production if its `metric` is strictly greater than production's (or `force`).

        The decision, promoted or not, is appended to the history. It is made on the production pointer
        as read, and production.json is replaced only if it is still that version (compare-and-set): if
        another promotion changed it meanwhile, this one reads production again and decides again."""
        candidate = self.get(version)
        self.store.ensure_bucket(self.bucket)
        for _ in range(RACES):
            found = self.store.get_versioned(self.bucket, self._production_key())
            result, production = self._decide(candidate, self._pointer(found), metric=metric, force=force,
                                              reason=reason)
            if production is not None:
                body = production.model_dump_json().encode()
                if self.store.put_if(self.bucket, self._production_key(), body,
                          etag=found.etag if found else None) is None:
                    continue  # production changed under this decision: decide again on the new one
            self._append(result)
            return result
        raise EsspError(f"model registry {self.name!r}: promoting version {version} lost {RACES} races for "
                        f"s3://{self.bucket}/{self._production_key()} (that many concurrent promotions?); "
                        "promote again")

    def _decide(self, candidate: ModelVersion, pointer: Production | None, *, metric: str, force: bool,
                reason: str | None) -> tuple[PromotionResult, Production | None]:
        """The promotion decision on production as ``pointer`` says, and the new pointer if it promotes."""
        version = candidate.version
        incumbent = None if pointer is None else self.get(pointer.version)

        def value(model: ModelVersion) -> float | None:
            if not force:
                return model.metric(metric)
            try:  # a forced promotion (a rollback) does not need the metric, only reports it
                return model.metric(metric)
            except EsspError:
                return None

        candidate_value = value(candidate)
        incumbent_value = None if incumbent is None else value(incumbent)
        note = f": {reason}" if reason else ""
        if incumbent is not None and incumbent.version == candidate.version:
            promoted, why = False, f"version {version} is already in production"
        elif force:
            promoted, why = True, f"forced{note}"
        elif incumbent is None:
            promoted, why = True, f"first promotion ({metric} {candidate_value:.4f}){note}"
        elif candidate_value > incumbent_value:  # both are numbers: value() raised otherwise
            promoted, why = True, (f"{metric} {candidate_value:.4f} > {incumbent_value:.4f} of production "
                                   f"version {incumbent.version}{note}")
        else:
            promoted, why = False, (f"{metric} {candidate_value:.4f} is not greater than {incumbent_value:.4f} of "
                                    f"production version {incumbent.version}")
        result = PromotionResult(registry=self.name, version=version, promoted=promoted, forced=force, metric=metric,
                                 candidate_value=candidate_value, incumbent=None if incumbent is None else
                                 incumbent.version, incumbent_value=incumbent_value, reason=why)
        if not promoted:
            return result, None
        return result, Production(version=version, promoted_at=result.at, reason=why, metric=metric,
                                  value=candidate_value, previous=result.incumbent)

    def rollback(self, version: int, *, reason: str | None = None) -> PromotionResult:
        """Put `version` back in production regardless of its metrics."""
        current = self.production_pointer()
        what = f"rollback from version {current.version}" if current else "rollback"
        return self.promote(version, force=True, reason=f"{what}{': ' + reason if reason else ''}")

    # history ----------------------------------------------------------------------------------

    def _append(self, result: PromotionResult) -> None:
        self.store.ensure_bucket(self.bucket)
        body = result.model_dump_json().encode()
        numbers = self._numbers(_EVENT_KEY, "promotions")
        number = (numbers[-1] if numbers else 0) + 1
        for _ in range(RACES):  # a concurrent writer may take the number: then the next one
            if self.store.put_if(self.bucket, f"{self.prefix}/promotions/{number:06d}.json", body,
                      etag=None) is not None:
                return
            number += 1
        raise EsspError(f"model registry {self.name!r}: could not append to the promotion history at "
                        f"s3://{self.bucket}/{self.prefix}/promotions/ ({RACES} concurrent writers took the numbers)")

    def history(self, *, promoted_only: bool = False) -> list[PromotionResult]:
        """Every promotion decision in order (only those that changed production with `promoted_only`)."""
        events = []
        for number in self._numbers(_EVENT_KEY, "promotions"):
            key = f"{self.prefix}/promotions/{number:06d}.json"
            try:
                event = PromotionResult.model_validate_json(self.store.get_bytes(self.bucket, key))
            except ValidationError as exc:
                raise EsspError(f"promotion record s3://{self.bucket}/{key} is not valid: {_problems(exc)}") from None
            if event.promoted or not promoted_only:
                events.append(event)
        return events


def registry_names(settings: Settings) -> list[str]:
    """Every registry that has a production model, in the models bucket."""
    store = ObjectStore(settings)
    try:
        keys = list(store.list_keys(settings.bucket_models, f"{REGISTRY_PREFIX}/"))
    except ObjectNotFound:
        return []
    return sorted({key.split("/")[1] for key in keys if key.endswith("/production.json")})
