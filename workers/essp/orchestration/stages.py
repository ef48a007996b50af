"""Stages: the units of work Airflow schedules, each runnable as `essp stage NAME`.

A stage is a plain function named after the DAG task that runs it: task ``verify_manifest`` runs stage
``verify-manifest``, which is :func:`essp.orchestration.train.verify_manifest` (:func:`stage` registers a
function under its own name, dashed; the operator derives the stage from its task id). Its first
argument is the settings (locally from Airflow's connections, in Kubernetes from the pod's variables and
Secret); the others are the stage's params, typed: :func:`run_stage` checks the JSON params against those
types (a pydantic model such as RunParams included) and refuses a missing, unknown or bad one by name. It
returns small JSON (URIs and metrics, never payloads). The same command runs as a local process or as the
command of a pod; see operators/stage.py. A stage that fails with a :class:`~essp.errors.UserError` (a bad
param, say) writes ``{"refused": "<the error, one line>"}`` as its result instead, so that its task fails
with that line (essp.operators.refusal).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import typing
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from essp.errors import EsspError, UserError, describe_validation, one_line
from essp.registry import Registry
from essp.settings import Settings

StageFn = Callable[..., dict[str, Any]]
# Environment variable naming where a stage writes its JSON result: a file (local mode), or in Kubernetes
# mode an s3:// URI of the runs bucket named after the pod, which the operator reads back (no exec into the pod,
# so the operator's Role needs no pods/exec).
RESULT_FILE_ENV = "ESSP_RESULT_FILE"
KUBERNETES_RESULT_PREFIX = "stage-results"


def kubernetes_result_uri(settings: Settings, pod_name: str) -> str:
    """Where the stage pod ``pod_name`` writes its result (``pod_name`` may be ``$(ESSP_POD_NAME)``, which the
    kubelet expands from the downward API)."""
    return f"s3://{settings.bucket_runs}/{KUBERNETES_RESULT_PREFIX}/{pod_name}.json"
# The modules whose import registers the stages, one per DAG (they import no torch: a stage that needs it
# imports it when it runs, so a light stage starts in a fraction of a second).
STAGE_MODULES = ("essp.orchestration.smoke", "essp.orchestration.train", "essp.orchestration.nightly",
                 "essp.orchestration.predict", "essp.orchestration.control")


class UnknownStage(EsspError):
    pass


class StageParamsError(UserError, ValueError):
    """A stage's params that do not fit its signature; the message names each bad param."""


STAGES: Registry[StageFn] = Registry("stage", unknown=UnknownStage)


def stage_name(function_name: str) -> str:
    """A task's (or function's) name as a stage name: ``verify_manifest`` -> ``verify-manifest``."""
    return function_name.replace("_", "-")


def stage(fn: StageFn) -> StageFn:
    """Register ``fn`` as the stage named after it."""
    return STAGES.add(stage_name(fn.__name__), fn)


def load_stages() -> None:
    for module in STAGE_MODULES:
        importlib.import_module(module)


def stage_names() -> list[str]:
    load_stages()
    return sorted(STAGES)


@cache
def params_model(fn: StageFn) -> type[BaseModel]:
    """A pydantic model of ``fn``'s params (every argument after the settings)."""
    hints = typing.get_type_hints(fn)
    fields: dict[str, Any] = {}
    for name, param in list(inspect.signature(fn).parameters.items())[1:]:
        default = ... if param.default is inspect.Parameter.empty else param.default
        fields[name] = (hints.get(name, Any), default)
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return create_model(f"{fn.__name__}_params", __config__=config, **fields)


def bind_params(name: str, fn: StageFn, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked against ``fn``'s signature, as its keyword arguments."""
    model = params_model(fn)
    try:
        bound = model.model_validate(params)
    except ValidationError as exc:
        raise StageParamsError(f"stage {name}: {describe_validation(exc)}") from None
    return {field: getattr(bound, field) for field in type(bound).model_fields}


def run_stage(name: str, settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Run one stage and write its result where ``ESSP_RESULT_FILE`` says, if set (``{"refused": line}`` if it
    fails with a :class:`~essp.errors.UserError`, which is raised on)."""
    load_stages()
    fn = STAGES.get(name)
    try:
        result = fn(settings, **bind_params(name, fn, params))
    except UserError as exc:
        _write_result(settings, {"refused": one_line(exc)})
        raise
    json.dumps(result)  # a stage result must be small JSON; fail here, not in XCom
    _write_result(settings, result)
    return result


def _write_result(settings: Settings, result: dict[str, Any]) -> None:
    target = os.environ.get(RESULT_FILE_ENV)
    if target and target.startswith("s3://"):
        from essp.clients.s3 import ObjectStore, S3Uri

        uri = S3Uri.parse(target)
        ObjectStore(settings).put_json(uri.bucket, uri.key, result)
    elif target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(result))
