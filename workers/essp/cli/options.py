"""Command-line options made from a params model, so that a command takes exactly the params a DAG's
trigger form shows, with the same names, descriptions and checks (`essp train` takes RunParams)."""

from __future__ import annotations

import inspect
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any

import typer
from pydantic import BaseModel

SCALARS = (bool, int, float, str)


def _scalar(annotation: Any) -> type | None:
    """int, float, str or bool when the field is one of those (optionally None), else None (JSON)."""
    if annotation in SCALARS:
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1 and inner[0] in SCALARS:
            return inner[0]
    return None


def model_options(model: type[BaseModel], *, aliases: dict[str, list[str]] | None = None) -> list[inspect.Parameter]:
    """One ``--name`` option per field (lists and objects as JSON), each unset by default: the model's
    default applies."""
    parameters = []
    for name, field in model.model_fields.items():
        scalar = _scalar(field.annotation)
        dashed = name.replace("_", "-")
        default = "required" if field.is_required() else json.dumps(field.get_default(call_default_factory=True))
        help_text = f"{field.description or field.title or name} (default: {default})"
        if scalar is bool:
            decls = [f"--{dashed}/--no-{dashed}"]
        else:
            decls = [f"--{dashed}", *(aliases or {}).get(name, [])]
            if scalar is None:
                is_list = typing.get_origin(field.annotation) is list
                help_text += " (JSON; a list also as a,b,c)" if is_list else " (JSON)"
        kind = scalar if scalar is not None else str
        option = typer.Option(*decls, help=help_text, show_default=False)
        parameters.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[kind | None, option]))  # type: ignore[valid-type]
    return parameters


def given_values(model: type[BaseModel], options: dict[str, Any]) -> dict[str, Any]:
    """The options that were given, JSON ones parsed (a bad one is a BadParameter naming it)."""
    values = {}
    for name, value in options.items():
        if value is None or name not in model.model_fields:
            continue
        annotation = model.model_fields[name].annotation
        if _scalar(annotation) is None:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                if typing.get_origin(annotation) is not list:
                    raise typer.BadParameter(f"not JSON: {exc}", param_hint=f"--{name.replace('_', '-')}") from None
                value = [item.strip() for item in value.split(",") if item.strip()]  # a list: a,b,c will do
        values[name] = value
    return values


def with_model_options(model: type[BaseModel], *, aliases: dict[str, list[str]] | None = None,
                       ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command (whose own options come first in its signature, then ``**options``) one option per
    field of ``model``."""
    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        hints = typing.get_type_hints(fn, include_extras=True)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
        fn.__signature__ = inspect.Signature([*own, *model_options(model, aliases=aliases)])  # type: ignore[attr-defined]
        return fn
    return decorate
