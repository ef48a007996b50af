"""A user error fails its task with one line: no traceback, no retry, and the line as the DAG run's note.

What a param's JSON schema can say, Airflow refuses when the run is created (the trigger form and the REST
API alike; each param against its own schema only, see essp.orchestration.params). What only code can
check (a weight for each of the run's streams, `fusion: weighted` without weights, a run another DAG run
trains: an :class:`essp.errors.UserError`) fails the first task of the run, and this module makes that
failure read as the one line it is:

- the task log: Airflow 3.3's task runner (``airflow/sdk/execution_time/task_runner.py``,
  ``_run_task_and_map_outcome``) logs every exception a task raises with its stack ("Task failed with
  exception"; AirflowFailException too), except SystemExit, which it logs as "Task exited" with its exit
  code and no stack, and then fails the task (or retries it, if it has retries left). :class:`Refused` is
  that SystemExit; :func:`refuse` logs the line as the task's last message before it.
- the DAG run's note: a task cannot set it (the execution API has no route for it, and a task has no
  database: ``supervisor.block_orm_access``). The task pushes the line as the XCom ``essp_refused`` and
  :data:`NOTES`, a listener (the ESSP plugin's ``listeners``), copies it into the note when the scheduler
  marks the DAG run failed (``DagRun.update_state`` -> ``on_dag_run_failed``, in the scheduler's session).
- the ESSP report tab: the DAG run's record (essp.orchestration.links.save_dag_run_record) gets
  ``error``: the line.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

from airflow.exceptions import AirflowException
from airflow.listeners import hookimpl

from essp.errors import UserError, one_line

REFUSAL_KEY = "essp_refused"
MAX_NOTE = 1000  # DagRunNote.content is a String(1000)
log = logging.getLogger(__name__)


class Refused(SystemExit):
    """The task is refused: ``str()`` is the one line (its exit code, 2, is what "Task exited" logs)."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line
        self.code = 2

    def __str__(self) -> str:
        return self.line


class StageRefused(AirflowException):
    """A stage ended with a :class:`~essp.errors.UserError` (its result file says ``{"refused": line}``)."""

    def __init__(self, stage: str, line: str) -> None:
        super().__init__(line)
        self.stage = stage
        self.line = line


def refuse(context: Any, line: str) -> NoReturn:
    """Fail the running task with ``line``: logged, pushed for the DAG run's note, recorded for the report tab."""
    line = one_line(line)
    task = context["task"]
    task.log.error("%s", line)
    try:
        context["ti"].xcom_push(key=REFUSAL_KEY, value=line)
    except Exception as exc:  # noqa: BLE001 - the line is in the log; the note is a convenience
        task.log.warning("(the DAG run's note is not set: %s)", one_line(exc))
    _record(context, line)
    raise Refused(line)


@contextmanager
def refusing(context: Any) -> Iterator[None]:
    """A :class:`~essp.errors.UserError` raised in the block refuses the task (:func:`refuse`)."""
    try:
        yield
    except UserError as exc:
        refuse(context, str(exc))


def _record(context: Any, line: str) -> None:
    """``error`` in the DAG run's record, for its "ESSP report" tab (essp.orchestration.links)."""
    from essp.operators.hooks import stage_settings
    from essp.orchestration.links import save_dag_run_record

    dag_run = context["dag_run"]
    try:
        save_dag_run_record(stage_settings(), dag_run.dag_id, dag_run.run_id, error=line)
    except Exception as exc:  # noqa: BLE001 - S3 down, say: the line is in the log and the note
        context["task"].log.warning("(the ESSP report tab will not show it: %s)", one_line(exc))


class RefusalNotes:
    """A listener: the line a task of a failed DAG run was refused with becomes the DAG run's note (added to an
    existing note, e.g. one given when triggering). Runs where the scheduler decides the DAG run's state, in
    its session (``dag.test()`` hands over a DagRun outside any session: the note is then written in one of
    its own)."""

    @hookimpl
    def on_dag_run_failed(self, dag_run: Any, msg: str) -> None:
        from airflow.models.dagrun import DagRun
        from airflow.utils.session import create_session
        from sqlalchemy import select
        from sqlalchemy.orm import object_session

        try:
            session = object_session(dag_run)
            if session is not None:
                note_refusal(session, dag_run)
                return
            with create_session() as session:
                note_refusal(session, session.scalars(select(DagRun).where(
                    DagRun.dag_id == dag_run.dag_id, DagRun.run_id == dag_run.run_id)).one())
        except Exception:  # a listener must never break the scheduler's loop
            log.exception("ESSP: could not note the refusal of DAG run %s", getattr(dag_run, "run_id", "?"))


def note_refusal(session: Any, dag_run: Any) -> str | None:
    """Add to the note of ``dag_run`` (an ORM DagRun of ``session``) the line a task of it was refused with, if
    one was (the XCom :data:`REFUSAL_KEY`); returns that line."""
    from airflow.models.xcom import XComModel

    query = XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id, key=REFUSAL_KEY, limit=1)
    row = session.scalars(query).first()
    if row is None:
        return None
    line = str(XComModel.deserialize_value(row))
    if line not in (dag_run.note or ""):
        dag_run.note = "\n".join(filter(None, [dag_run.note, line]))[:MAX_NOTE]
    return line


NOTES = RefusalNotes()
