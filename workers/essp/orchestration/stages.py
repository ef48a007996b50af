"""Stages: the units of work Airflow schedules, each runnable as `essp stage NAME`.

A stage is a plain function ``(settings, params) -> dict`` registered under a name. It gets its
settings from the environment (locally from Airflow's connections, in Kubernetes from the pod's
variables and Secret) and returns small JSON: URIs and metrics, never payloads. The same command
runs as a local process or as the command of a pod; see operators/stage.py.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from essp.errors import EsspError
from essp.settings import Settings

StageFn = Callable[[Settings, dict[str, Any]], dict[str, Any]]
# Environment variable naming the file a stage writes its JSON result to. In Kubernetes mode it is
# the file the XCom sidecar reads.
RESULT_FILE_ENV = "ESSP_RESULT_FILE"
KUBERNETES_RESULT_FILE = "/airflow/xcom/return.json"
# Modules whose import registers the built-in stages.
BUILTIN_STAGE_MODULES = ("essp.orchestration.smoke", "essp.orchestration.train", "essp.orchestration.ops")

_registry: dict[str, StageFn] = {}


class UnknownStage(EsspError):
    pass


def stage(name: str) -> Callable[[StageFn], StageFn]:
    """Register a stage function under ``name``."""
    def register(fn: StageFn) -> StageFn:
        if name in _registry and _registry[name] is not fn:
            raise ValueError(f"stage {name!r} is registered twice")
        _registry[name] = fn
        return fn
    return register


def _load_builtin() -> None:
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)


def stage_names() -> list[str]:
    _load_builtin()
    return sorted(_registry)


def run_stage(name: str, settings: Settings, params: dict[str, Any]) -> dict[str, Any]:
    """Run one stage and write its result where ``ESSP_RESULT_FILE`` says, if set."""
    _load_builtin()
    if name not in _registry:
        raise UnknownStage(f"unknown stage {name!r}; known stages: {', '.join(sorted(_registry))}")
    result = _registry[name](settings, params)
    json.dumps(result)  # a stage result must be small JSON; fail here, not in XCom
    target = os.environ.get(RESULT_FILE_ENV)
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(result))
    return result
