"""The epochs of a training run as Airflow tasks: one task per stream (dynamic task mapping), each
deferring on :class:`~essp.operators.triggers.EpochDoneTrigger` while its resident trainer trains.

For each epoch: plan it (the first stream task of the DAG run to get there publishes the plan, the
others find it planned), wait in the triggerer until every stream's trainer has finished it, write the
epoch's figures to the task log, go on with the next. Any task of the DAG run can advance the run,
so the streams never wait on each other's Airflow task, only on the trainers (which is also why
``dag.test()``, running one task at a time, works). A retried task resumes from the epochs the
trainers finished (their checkpoints); a new DAG run re-plans an unfinished epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta
from typing import Any, NamedTuple

from airflow.exceptions import AirflowException
from airflow.sdk import BaseOperator
from essp.operators.links import WorkerLogsLink
from essp.operators.stage import stage_settings
from essp.operators.triggers import EpochDoneTrigger


class TrainStreamOperator(BaseOperator):
    """Train ``stream`` of the ESSP run ``run`` for all its epochs, deferring between epochs.

    :param run: the ESSP run id (templated; the run's spec.json must be in S3: the prepare stage).
    :param stream: the stream this task reports on (templated; mapped over the run's streams).
    """

    template_fields: Sequence[str] = ("run", "stream")
    ui_color = "#fde2c8"
    operator_extra_links = (WorkerLogsLink(),)

    def __init__(self, *, run: str, stream: str, poll_s: float = 1.0, **kwargs: Any) -> None:
        # A retry goes on from the epochs the trainers finished (a lost triggerer or worker costs nothing).
        kwargs.setdefault("retries", 2)
        kwargs.setdefault("retry_delay", timedelta(seconds=10))
        super().__init__(**kwargs)
        self.run = run
        self.stream = stream
        self.poll_s = poll_s

    def _load(self) -> tuple[Any, Any]:
        from essp.training.epochs import load_run

        settings = stage_settings()
        spec, _ = load_run(settings, self.run)
        if self.stream not in spec.streams:
            raise AirflowException(f"run {self.run} has no stream {self.stream!r} (streams: {', '.join(spec.streams)})")
        return settings, spec

    def execute(self, context: Any) -> dict[str, Any]:
        from essp.training.epochs import trained_epochs

        settings, spec = self._load()
        first = trained_epochs(settings, spec)
        if first:
            self.log.info("Run %s: every stream has finished %d epoch(s); going on from epoch %d", self.run, first,
                          first)
        return self._advance(context, settings, spec, first, [])

    def _advance(self, context: Any, settings: Any, spec: Any, epoch: int, history: list[dict]) -> dict[str, Any]:
        from essp.deploy.fleet import worker_mode
        from essp.training.epochs import plan_epoch_once

        if epoch >= spec.epochs:
            final = history[-1] if history else {}
            self.log.info("Stream %s of run %s: %d epochs trained", self.stream, self.run, spec.epochs)
            return {"run": self.run, "stream": self.stream, "epochs": spec.epochs, "final": final,
                    "history": history[-50:]}
        finished = self._finished(settings, spec, epoch)
        if finished is not None:  # already trained (a lagging stream's task): neither plan nor wait
            return self.epoch_done(context, {**finished, "carry": {"history": history[-50:]}})
        token = f"{context['dag_run'].dag_id}/{context['dag_run'].run_id}"
        if plan_epoch_once(settings, spec, epoch, token):
            self.log.info("Planned and published epoch %d of run %s", epoch, self.run)
        else:
            self.log.info("Epoch %d of run %s is already planned by this DAG run", epoch, self.run)
        redis = {"host": settings.redis_host, "port": settings.redis_port, "db": settings.redis_db,
                 "prefix": settings.redis_prefix,
                 "password": settings.redis_password.get_secret_value() if settings.redis_password else None}
        local = worker_mode(settings) == "local"
        self.defer(trigger=EpochDoneTrigger(run=self.run, streams=list(spec.streams), epoch=epoch, redis=redis,
                                            timeout_s=spec.epoch_timeout_s, poll_s=self.poll_s,
                                            state_dir=str(settings.state_dir) if local else None,
                                            carry={"history": history[-50:]}),
                   method_name="epoch_done",
                   timeout=None)  # the trigger times out itself, and not while the run is paused
        raise AssertionError("unreachable: defer() raises")  # pragma: no cover

    def _finished(self, settings: Any, spec: Any, epoch: int) -> dict[str, Any] | None:
        """The trigger's "done" event if every stream has finished ``epoch`` already, else None."""
        from essp.training.epochs import trainer_state

        stats = {}
        for stream in spec.streams:
            state = trainer_state(settings, self.run, stream)
            if int(state.get("epoch_done", -1)) < epoch:
                return None
            stats[stream] = state.get("stats", {})
        return {"run": self.run, "epoch": epoch, "status": "done", "stats": stats}

    def epoch_done(self, context: Any, event: dict[str, Any] | None = None, **_: Any) -> dict[str, Any]:
        from essp.training.epochs import epoch_line

        if not event:
            raise AirflowException(f"run {self.run}: the epoch trigger ended without an event")
        epoch = int(event["epoch"])
        history = list(event.get("carry", {}).get("history", []))
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
                                                                     "data_wait") if k in own}}]
        return self._advance(context, settings, spec, epoch + 1, history)


class TrainingTasks(NamedTuple):
    first: Any  # verify_manifest
    register: Any
    summary: Any
    release: Any  # release_workers, the teardown


def training_tasks(plan: Any) -> TrainingTasks:
    """The tasks of a training run after its params are planned (``plan``: the XComArg of a
    ``multiple_outputs`` task returning :func:`essp.orchestration.params.plan_run`).

    verify_manifest -> ensure_workers -> train (mapped over the streams) -> release_trainers
    -> score_test, score_train -> fuse_and_report -> register -> report_summary; release_workers
    runs at the end whatever happened (stops the run's trainers, optionally the data workers)."""
    from airflow.sdk import task
    from airflow.task.trigger_rule import TriggerRule
    from essp.operators.stage import EsspStageOperator

    verify = EsspStageOperator(task_id="verify_manifest", stage="train-prepare", stage_params=plan["spec"],
                               cpu="500m", memory="1Gi")
    ensure = EsspStageOperator(task_id="ensure_workers", stage="workers-ensure", stage_params=plan["ensure"],
                               cpu="250m", memory="512Mi")
    @task(task_id="streams")
    def streams(names: list[str]) -> list[str]:
        """The run's streams, as a list to map the train task over."""
        return list(names)

    stream_names = streams(plan["streams"])
    train = TrainStreamOperator.partial(task_id="train", run=plan["run"],
                                        map_index_template="{{ task.stream }}").expand(stream=stream_names)
    release_trainers = EsspStageOperator(task_id="release_trainers", stage="workers-release",
                                         stage_params=plan["release_trainers"], cpu="250m", memory="512Mi",
                                         trigger_rule=TriggerRule.ALL_DONE)
    # Scoring runs both streams' models over every video: on a GPU in Kubernetes (the run's device).
    score_test = EsspStageOperator(task_id="score_test", stage="train-score", stage_params=plan["score_test"],
                                   cpu="4", memory="8Gi", gpus=1)
    score_train = EsspStageOperator(task_id="score_train", stage="train-score", stage_params=plan["score_train"],
                                    cpu="4", memory="8Gi", gpus=1)
    fuse = EsspStageOperator(task_id="fuse_and_report", stage="train-fuse-report", stage_params=plan["fuse"],
                             cpu="1", memory="2Gi")
    register = EsspStageOperator(task_id="register", stage="train-register",
                                 stage_params={"run": plan["run"], "fused": fuse.output}, cpu="250m", memory="512Mi")

    @task(task_id="report_summary")
    def report_summary(fused: dict, registered: dict) -> dict:
        from essp.evaluation.report import read_report, summary_lines

        report = read_report(stage_settings(), fused["run"])
        print(f"ESSP report of run {fused['run']}: {fused['report']}")
        for line in summary_lines(report):
            print(f"  {line}")
        print(f"  registry {registered['registry']} v{registered['version']}: "
              f"{'promoted to production' if registered['promoted'] else 'not promoted'} ({registered['reason']})")
        return {"run": fused["run"], "selected": fused["selected"], "metrics": fused["metrics"],
                "registered": registered}

    summary = report_summary(fuse.output, register.output)
    release = EsspStageOperator(task_id="release_workers", stage="workers-release", stage_params=plan["release"],
                                cpu="250m", memory="512Mi", trigger_rule=TriggerRule.ALL_DONE)
    verify >> ensure >> stream_names
    train >> release_trainers
    [train, release_trainers] >> score_test
    [train, release_trainers] >> score_train
    [score_test, score_train] >> fuse >> register
    # release_workers is the teardown of ensure_workers: it runs however the run ended, and does not
    # decide the DAG run's state (a failed training stays a failed run).
    summary >> release.as_teardown(setups=ensure)
    return TrainingTasks(verify, register, summary, release)
