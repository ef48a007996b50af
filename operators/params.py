"""A DAG's ``params``, as Airflow ``Param`` objects, from the pydantic model that defines them (see
:func:`essp.orchestration.params.form_params`), and its description and docs from its module's docstring."""

from __future__ import annotations

import re

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


_CODE_SPAN = re.compile(r"`[^`]*`")


def dag_docs(doc: str | None) -> dict[str, str]:
    """``description=`` and ``doc_md=`` of a DAG from its module's docstring: the description (shown in the DAG
    list) is the first paragraph after ``dag_id:``, capitalised; the docs are the whole docstring, rendered as Markdown.
    Placeholders in angle brackets must be in code spans, or Markdown takes them for HTML and drops them
    (``s3://<runs bucket>/`` rendered as ``s3:///``): a docstring with one outside a code span is refused."""
    doc = (doc or "").strip()
    first = " ".join(doc.split("\n\n", 1)[0].split())
    dag_id, _, summary = first.partition(": ")
    if not summary:
        raise ValueError(f"a DAG's docstring starts with 'dag_id: what it does', not {first[:60]!r}")
    loose = re.findall(r"<[^>\s][^>]*>", _CODE_SPAN.sub("", doc))
    if loose:
        raise ValueError(f"{dag_id}'s docstring has {', '.join(loose)} outside a code span: Markdown would drop it "
                         "as HTML; put it in backticks")
    return {"description": summary[:1].upper() + summary[1:], "doc_md": doc}
