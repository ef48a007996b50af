"""A DAG's params as Airflow's trigger form takes them, derived from the one pydantic model that defines
them (:class:`~essp.lifecycle.params.RunParams` for essp_train, and the models of the other DAGs).

:func:`form_params` turns each field into the keyword arguments of an ``airflow.sdk.Param``: its default,
title, description, form section, and its JSON schema (type, enum, bounds, pattern, the keys a dict
takes), so that Airflow refuses a value outside the schema when the run is created (the form and the REST
API alike) and the model refuses, naming the param, what one field's schema cannot say: Airflow checks each
param against its own schema only (``ParamsDict.validate``, in ``DAG.create_dagrun``), so a condition on two
params (a weight for each of the run's ``streams``) is the model's, checked by the DAG's first task. Two
shapes are chosen for Airflow 3.3's form (tried in Chromium, tests/test_airflow_ui.py): an optional field
(``None`` allowed) has ``null`` in its type, so an empty field is not a missing one (a ``""`` default kept
Trigger disabled);
and bounds go inside ``allOf``, so that an out-of-range number is refused with its reason when the run
is created instead of being clamped by the form's number field (0 in ``epochs`` became 1, silently).
Airflow-free: ``essp.operators.params.dag_params`` makes the Param objects.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from essp.training.params import SECTIONS

# Schema keys the form and Airflow's validation use; the rest of pydantic's output is left out.
_KEPT = ("type", "enum", "items", "minItems", "maxItems", "uniqueItems", "additionalProperties", "propertyNames",
         "minProperties", "maxProperties", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "minLength",
         "maxLength", "pattern", "format")
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def field_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """One property of a model's JSON schema in the flat form the trigger form understands: an optional
    field's ``anyOf: [X, null]`` becomes X with ``null`` added to its type (and to its enum)."""
    branches = schema.get("anyOf")
    nullable = False
    if branches:
        rest = [b for b in branches if b.get("type") != "null"]
        nullable = len(rest) < len(branches)
        if len(rest) != 1:
            raise ValueError(f"a param's schema must be one type, optionally null: {schema}")
        schema = {**schema, **rest[0]}
    out = {key: schema[key] for key in _KEPT if key in schema}
    # Airflow's number field clamps to a top-level minimum/maximum when it loses focus (0 typed into
    # `epochs` became 1, silently); bounds inside allOf are checked when the run is created instead, and
    # an out-of-range value is refused with its reason ("0 is less than the minimum of 1").
    bounds = {key: out.pop(key) for key in _BOUNDS if key in out}
    if bounds:
        out["allOf"] = [bounds]
    if nullable:
        kinds = out.get("type", [])
        out["type"] = [*(kinds if isinstance(kinds, list) else [kinds]), "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
            out["values_display"] = {"None": "(empty)"}
    return out


def _range(bounds: dict[str, Any]) -> str:
    """The bounds in words, for the description (the form does not show them)."""
    low = (f">= {bounds['minimum']}" if "minimum" in bounds
           else f"> {bounds['exclusiveMinimum']}" if "exclusiveMinimum" in bounds else "")
    high = (f"<= {bounds['maximum']}" if "maximum" in bounds
            else f"< {bounds['exclusiveMaximum']}" if "exclusiveMaximum" in bounds else "")
    return " and ".join(part for part in (low, high) if part)


def form_params(model: type[BaseModel]) -> dict[str, dict[str, Any]]:
    """Each field of ``model`` as ``Param`` keyword arguments, in form order (by section, then as declared)."""
    properties = model.model_json_schema()["properties"]
    order = {name: i for i, name in enumerate(SECTIONS)}
    names = sorted(properties, key=lambda n: order.get(properties[n].get("section", ""), len(order)))
    out = {}
    for name in names:
        prop = properties[name]
        field = model.model_fields[name]
        schema = field_schema(prop)
        description = prop.get("description", "")
        if schema.get("allOf"):
            description = f"{description} ({_range(schema['allOf'][0])})".strip()
        spec: dict[str, Any] = {"title": prop.get("title", name), "description": description,
                                "section": prop.get("section"), **schema}
        if not field.is_required():
            default = field.get_default(call_default_factory=True)
            spec["default"] = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
        out[name] = {k: v for k, v in spec.items() if v is not None or k == "default"}
    return out
