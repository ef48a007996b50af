"""A DAG's ``params``, as Airflow ``Param`` objects, from the pydantic model that defines them (see
:func:`essp.orchestration.params.form_params`)."""

from __future__ import annotations

from airflow.sdk import Param
from pydantic import BaseModel

from essp.orchestration.params import form_params


def dag_params(model: type[BaseModel]) -> dict[str, Param]:
    """``params=`` of a DAG whose params are the fields of ``model``."""
    params = {}
    for name, spec in form_params(model).items():
        spec = dict(spec)
        # A field without a default is a required param (Param without a default).
        params[name] = Param(spec.pop("default"), **spec) if "default" in spec else Param(**spec)
    return params
