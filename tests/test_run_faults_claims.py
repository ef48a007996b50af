"""Fault 14 of issue 11 on the real S3: DAG runs claiming one ESSP run at once. Exactly one wins (an S3
conditional PUT); the others are refused naming the owner; a retry of the owner's task is not refused;
a finished owner's claim is taken over (resuming a run by its id), a running one's never; the owner's
teardown gives it back. (The same through Airflow: tests/test_run_faults_dag.py.)"""

from __future__ import annotations

import threading

import pytest

from essp.lifecycle.claims import RunClaimed, claim_run, release_run, run_owner

pytestmark = pytest.mark.fault

RUN = "claimed-run"


def test_of_dag_runs_claiming_one_run_at_once_exactly_one_wins(settings):
    owners = [f"essp_train/manual__{i}" for i in range(6)]
    barrier = threading.Barrier(len(owners))
    results: dict[str, object] = {}

    def claim(owner: str) -> None:
        barrier.wait()
        try:
            results[owner] = claim_run(settings, RUN, owner, owner_state=lambda _: "running")
        except RunClaimed as exc:
            results[owner] = exc

    threads = [threading.Thread(target=claim, args=(owner,)) for owner in owners]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    winners = [o for o, r in results.items() if isinstance(r, dict)]
    assert len(results) == len(owners) and len(winners) == 1, results
    winner = winners[0]
    assert results[winner]["claimed"] == "new" and run_owner(settings, RUN) == winner
    for owner, refused in results.items():
        if owner != winner:
            assert f"run {RUN} is already being trained by DAG run {winner}" in str(refused)
            assert "that DAG run is running" in str(refused)
    # a retry of the owner's task is not refused
    assert claim_run(settings, RUN, winner)["claimed"] == "again"
    # an owner whose state is unknown keeps its claim
    with pytest.raises(RunClaimed, match="in an unknown state"):
        claim_run(settings, RUN, "essp_train/manual__late")


def test_a_finished_owners_claim_is_taken_over_and_the_teardown_gives_it_back(settings):
    first, second = "essp_train/manual__first", "essp_train/manual__second"
    assert claim_run(settings, RUN, first)["claimed"] == "new"
    # the first DAG run ended without its teardown (failed, marked failed by hand): the run is resumed
    taken = claim_run(settings, RUN, second, owner_state={first: "failed"}.get)
    assert taken["claimed"] == "taken over" and taken["previous"] == first
    assert run_owner(settings, RUN) == second
    assert release_run(settings, RUN, first) is False  # not its claim any more
    assert release_run(settings, RUN, second) is True and run_owner(settings, RUN) is None
    assert claim_run(settings, RUN, first)["claimed"] == "new"
