"""The training run's tasks: the ``train`` operator (one task per stream, deferring on
:class:`~essp.operators.triggers.EpochDoneTrigger` while its resident trainer trains each epoch), and the
task groups a training DAG is built from (``prepare``, ``train``, ``evaluate``, ``register``, and the
``release_workers`` teardown), which ``dags/essp_train.py`` and ``dags/essp_nightly_retrain.py`` wire
together.

For each epoch the ``train`` task plans it (the first stream task of the DAG run to get there publishes
the plan, the others find it planned), waits in the triggerer until every stream's trainer has finished
it, writes the epoch's figures to the task log, and goes on with the next. Any task of the DAG run can
advance the run, so the streams never wait on each other's Airflow task, only on the trainers (which is
also why ``dag.test()``, running one task at a time, works). A retried task resumes from the epochs the
trainers finished (their checkpoints); a new DAG run re-plans an unfinished epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NamedTuple

from airflow.exceptions import AirflowException
from airflow.sdk import BaseOperator, TaskGroup, get_current_context, task
from airflow.task.trigger_rule import TriggerRule

from essp.connections import REDIS_CONN_ID
from essp.operators.hooks import stage_settings
from essp.operators.links import WorkerLogsLink
from essp.operators.stage import EsspStageOperator, pull_upstream
from essp.operators.triggers import EpochDoneTrigger

HISTORY_KEPT = 50
# A retry goes on from the epochs the trainers finished; one whose trainer died restarts it (recovery).
TRAIN_RETRIES = 2
TRAIN_RETRY_DELAY = timedelta(seconds=10)


class TrainStreamOperator(BaseOperator):
    """Train ``stream`` of the ESSP run ``run`` for all its epochs, deferring between epochs.

    :param run: the ESSP run id (templated; the run's spec.json must be in S3: verify_manifest).
    :param stream: the stream this task reports on (templated; mapped over the run's streams).
    """

    template_fields: Sequence[str] = ("run", "stream")
    ui_color = "#fde2c8"
    operator_extra_links = (WorkerLogsLink(),)

    def __init__(self, *, run: str, stream: str, poll_s: float = 1.0, **kwargs: Any) -> None:
        # A retry goes on from the epochs the trainers finished (a lost triggerer or worker costs nothing).
        kwargs.setdefault("retries", TRAIN_RETRIES)
        kwargs.setdefault("retry_delay", TRAIN_RETRY_DELAY)
        super().__init__(**kwargs)
        self.run = run
        self.stream = stream
        self.poll_s = poll_s

    def _load(self) -> tuple[Any, Any]:
        from essp.lifecycle.epochs import load_run

        settings = stage_settings()
        spec, _ = load_run(settings, self.run)
        if self.stream not in spec.streams:
            raise AirflowException(f"run {self.run} has no stream {self.stream!r} (streams: {', '.join(spec.streams)})")
        return settings, spec

    def execute(self, context: Any) -> dict[str, Any]:
        from essp.lifecycle.epochs import trained_epochs

        settings, spec = self._load()
        first = trained_epochs(settings, spec)
        if first:
            self.log.info("Run %s: every stream has finished %d epoch(s); going on from epoch %d", self.run, first,
                          first)
        ti = context["ti"]
        if ti.try_number > 1 and first < spec.epochs:
            # A retry: a trainer that died mid-epoch is started again (from its checkpoint) and the epoch is
            # delivered again, or the new trainer would wait for samples its predecessor took with it.
            from essp.lifecycle.recovery import recover_epoch

            recover_epoch(settings, spec, first, stream=self.stream, token=self._token(context),
                          planner=self._planner(context), log=self.log.info)
        return self._advance(context, settings, spec, first, [])

    @staticmethod
    def _token(context: Any) -> str:
        return f"{context['dag_run'].dag_id}/{context['dag_run'].run_id}"

    @staticmethod
    def _planner(context: Any) -> str:
        ti = context["ti"]
        return f"{ti.task_id}[{ti.map_index}]#{ti.try_number}"

    def _advance(self, context: Any, settings: Any, spec: Any, epoch: int, history: list[dict]) -> dict[str, Any]:
        from essp.deploy.fleet import worker_mode
        from essp.lifecycle.allocation import apply_allocation
        from essp.lifecycle.epochs import early_stopped, epoch_status, plan_epoch_once
        from essp.lifecycle.liveness import observe_pause

        stopped = early_stopped(settings, self.run)
        if epoch >= spec.epochs or stopped is not None:
            final = history[-1] if history else {}
            trained = spec.epochs if stopped is None else int(stopped["epoch"]) + 1
            if stopped is not None:
                self.log.info("Run %s stopped early after epoch %d: %s", self.run, stopped["epoch"],
                              stopped["reason"])
            self.log.info("Stream %s of run %s: %d epochs trained", self.stream, self.run, trained)
            return {"run": self.run, "stream": self.stream, "epochs": trained, "final": final,
                    "history": history[-HISTORY_KEPT:], "early_stop": stopped}
        carry = {"history": history[-HISTORY_KEPT:]}
        progress = epoch_status(settings, self.run, spec.streams, epoch)
        if progress.status == "done":  # already trained (a lagging stream's task): neither plan nor wait
            return self.epoch_done(context, {"run": self.run, "epoch": epoch, "status": "done",
                                             "stats": progress.done, "carry": carry})
        # with allocation validation_loss the planner first moves trainer slots (essp.lifecycle.allocation)
        before = (lambda: apply_allocation(settings, spec, epoch, log=self.log.info)) if epoch >= 1 else None
        if plan_epoch_once(settings, spec, epoch, self._token(context), planner=self._planner(context),
                           before=before):
            self.log.info("Planned and published epoch %d of run %s", epoch, self.run)
        else:
            self.log.info("Epoch %d of run %s is already planned by this DAG run", epoch, self.run)
        local = worker_mode(settings) == "local"
        if local:
            from essp.deploy.local import scope_digest, scope_of
        self.defer(trigger=EpochDoneTrigger(run=self.run, streams=list(spec.streams), epoch=epoch,
                                            redis_conn_id=REDIS_CONN_ID, timeout_s=spec.epoch_timeout_s,
                                            poll_s=self.poll_s, state_dir=str(settings.state_dir) if local else None,
                                            paused_base=observe_pause(settings, self.run), carry=carry,
                                            keep=spec.workers() if local else None,
                                            scope=scope_digest(scope_of(settings)) if local else None,
                                            namespace=None if local else settings.k8s_namespace),
                   method_name="epoch_done",
                   timeout=None)  # the trigger times out itself, and not while the run is paused
        raise AssertionError("unreachable: defer() raises")  # pragma: no cover

    def epoch_done(self, context: Any, event: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        from essp.lifecycle.epochs import early_stop_after, epoch_line
        from essp.training.validation import VAL_FIGURES

        if not event:
            raise AirflowException(f"run {self.run}: the epoch trigger ended without an event")
        epoch = int(event["epoch"])
        history = list(event.get("carry", {}).get("history", []))
        if event.get("status") == "short":
            # A local data worker crashed mid-epoch (the embedded default has no Deployment to restart it):
            # start it again, then wait on for the same epoch (already planned: not planned again).
            from essp.deploy.fleet import LocalFleet

            settings, spec = self._load()
            scaled = LocalFleet(settings).scale(spec.workers(), at_least=True)
            started = sorted(name for kind in scaled.values() for name in kind["started"])
            self.log.warning("Run %s, epoch %d: %s; started again: %s", self.run, epoch, event.get("detail"),
                             ", ".join(started) or "none (another task did)")
            return self._advance(context, settings, spec, epoch, history)
        if event.get("status") != "done":
            raise AirflowException(f"run {self.run}, epoch {epoch}: {event.get('detail')}")
        settings, spec = self._load()
        stats = event.get("stats", {})
        # The trainers' state holds their last epoch's figures: a task that finds a stream further on
        # (it lagged behind the trainers) says so instead of showing another epoch's figures.
        stats = {s: f for s, f in stats.items() if f and int(f.get("epoch", epoch)) == epoch}
        for stream in spec.streams:
            mark = "" if stream == self.stream else "   (other stream)"
            if stream in stats:
                self.log.info("%s%s", epoch_line(epoch, stream, stats[stream]).strip(), mark)
            else:
                self.log.info("epoch %d %s finished (its figures are in the run's report)%s", epoch, stream, mark)
        own = stats.get(self.stream, {})
        history = [*history, {"epoch": epoch, **{k: own[k] for k in ("loss", "accuracy", "samples_per_s",
                                                                     "data_wait", *VAL_FIGURES) if k in own}}]
        early_stop_after(settings, spec, epoch)  # with early_stop_patience: _advance then ends the task
        return self._advance(context, settings, spec, epoch + 1, history)


def claim_run(context: Any, plan: dict[str, Any]) -> dict[str, Any]:
    """Claim the plan's ESSP run for this DAG run (:mod:`essp.lifecycle.claims`): a second DAG run given the
    same ``run`` is refused while the first has not finished. Called by the first task of a training DAG."""
    from essp.lifecycle.claims import claim_run as claim

    ti = context["ti"]

    def owner_state(owner: str) -> str | None:
        dag_id, _, run_id = owner.partition("/")
        if not run_id:
            return None
        try:
            state = ti.get_dagrun_state(dag_id=dag_id, run_id=run_id)
        except Exception as exc:  # noqa: BLE001 - a DAG run Airflow no longer has is over; else unknown
            return "deleted" if "not found" in str(exc).lower() or "404" in str(exc) else None
        return str(getattr(state, "value", state))

    owner = f"{plan['dag_run']['dag_id']}/{plan['dag_run']['dag_run_id']}"
    return claim(stage_settings(), plan["run"], owner, owner_state=owner_state)


# -- the task groups of a training DAG -----------------------------------------------------------------
# ``plan`` is the XComArg of the task returning essp.orchestration.train.plan_run (run, streams, spec,
# dag_run). Task ids are not prefixed with their group's: each names its stage. One edge per dependency
# (issue 13): a task takes XComArgs only from the task right before it; what it needs of the plan (the run
# id, mostly) it reads when it runs (EsspStageOperator's xcom_params), else the plan task would have an edge
# to every task of the DAG and the graph, ten parallel edges out of it, is unreadable at fit-to-screen.
def from_plan(plan: Any, *keys: str) -> dict[str, tuple[str, str]]:
    """``xcom_params`` of a task that reads ``keys`` of the plan when it runs."""
    return {key: (plan.operator.task_id, key) for key in keys}


class Prepared(NamedTuple):
    group: TaskGroup
    ensure_workers: EsspStageOperator  # the setup that release_workers tears down


def prepare(plan: Any) -> Prepared:
    """verify_manifest (params against the manifest, spec.json to S3) -> ensure_workers (data workers scaled,
    the run's trainers started)."""
    with TaskGroup("prepare", prefix_group_id=False, tooltip="check the run, start its workers") as group:
        verify = EsspStageOperator(task_id="verify_manifest", stage_params={"spec": plan["spec"],
                                                                            "dag_run": plan["dag_run"]},
                                   cpu="500m", memory="1Gi")
        ensure = EsspStageOperator(task_id="ensure_workers", xcom_params=from_plan(plan, "run"), cpu="250m",
                                   memory="512Mi")
        verify >> ensure
    return Prepared(group, ensure)


@task(task_id="streams")
def _streams(plan_task: str) -> list[dict[str, str]]:
    """The run's streams, as the keyword arguments of the train task mapped over them."""
    context = get_current_context()
    plan = pull_upstream(context, context["task"], {"plan": (plan_task, None)})["plan"]
    return [{"run": plan["run"], "stream": stream} for stream in plan["streams"]]


def train(plan: Any) -> TaskGroup:
    """train, one task per stream, deferring while the trainers train each epoch -> release_trainers (their
    cores go to scoring)."""
    with TaskGroup("training", prefix_group_id=False, tooltip="every epoch, every stream") as group:
        # The retries are given to partial(): a mapped task's tries come from its partial arguments, and
        # the defaults TrainStreamOperator.__init__ sets were not seen by the scheduler (no retry ran).
        trainers = TrainStreamOperator.partial(task_id="train", retries=TRAIN_RETRIES, retry_delay=TRAIN_RETRY_DELAY,
                                               map_index_template="{{ task.stream }}").expand_kwargs(
            _streams(plan.operator.task_id))
        release = EsspStageOperator(task_id="release_trainers", xcom_params=from_plan(plan, "run"), cpu="250m",
                                    memory="512Mi", trigger_rule=TriggerRule.ALL_DONE)
        trainers >> release
    return group


class Evaluated(NamedTuple):
    group: TaskGroup
    fuse_and_report: EsspStageOperator


def evaluate(plan: Any) -> Evaluated:
    """score_test and score_val (every test and validation video, each stream's final checkpoint; on a GPU in
    Kubernetes) -> fuse_and_report (every fusion side by side, the learned ones fitted on the validation videos;
    the report to S3)."""
    with TaskGroup("evaluation", prefix_group_id=False, tooltip="score, fuse, report") as group:
        scores = [EsspStageOperator(task_id=f"score_{split}", xcom_params=from_plan(plan, "run"), cpu="4",
                                    memory="8Gi", gpus=1) for split in ("test", "val")]
        fuse = EsspStageOperator(task_id="fuse_and_report", xcom_params=from_plan(plan, "run"), cpu="1",
                                 memory="2Gi")
        scores >> fuse
    return Evaluated(group, fuse)


@task(task_id="report_summary")
def _report_summary(registered: dict, fused_task: str) -> dict:
    from essp.orchestration.train import report_summary

    context = get_current_context()
    fused = pull_upstream(context, context["task"], {"fused": (fused_task, None)})["fused"]
    for line in report_summary(stage_settings(), fused, registered):
        print(line)
    return {"run": fused["run"], "selected": fused["selected"], "metrics": fused["metrics"],
            "registered": registered}


class Registered(NamedTuple):
    group: TaskGroup
    register_model: EsspStageOperator
    summary: Any


def register(plan: Any, evaluated: Evaluated) -> Registered:
    """register_model (a new registry version, promoted only if better) -> report_summary."""
    fuse = evaluated.fuse_and_report
    with TaskGroup("registry", prefix_group_id=False, tooltip="register, promote, summarise") as group:
        registered = EsspStageOperator(task_id="register_model", stage_params={"fused": fuse.output},
                                       xcom_params=from_plan(plan, "run"), cpu="250m", memory="512Mi")
        summary = _report_summary(registered.output, fuse.task_id)
    return Registered(group, registered, summary)


def release_workers(plan: Any, prepared: Prepared, last: Any) -> EsspStageOperator:
    """The teardown of ensure_workers: stops the run's trainers (and the data workers, with the run's
    stop_data_workers) however the run ended, without deciding the DAG run's state, and gives the run's
    claim back."""
    release = EsspStageOperator(task_id="release_workers", xcom_params=from_plan(plan, "run", "dag_run"),
                                cpu="250m", memory="512Mi", trigger_rule=TriggerRule.ALL_DONE)
    last >> release.as_teardown(setups=prepared.ensure_workers)
    return release
