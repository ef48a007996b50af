"""The resident workers the ensure step keeps (essp.deploy.fleet, local mode): real worker processes scaled up,
left alone, scaled down; a trainer that cannot start is reported with its log; bad counts refused."""

from __future__ import annotations

import shutil

import pytest

from essp.deploy.fleet import FleetError, LocalFleet, ensure_workers, release_workers
from essp.deploy.local import worker_name
from essp.settings import SECRETS_FILE

pytestmark = pytest.mark.slow


@pytest.fixture
def fleet_settings(settings, base_settings, tmp_path):
    shutil.copy(base_settings.state_dir / SECRETS_FILE, tmp_path / SECRETS_FILE)
    own = settings.model_copy(update={"state_dir": tmp_path, "heartbeat_s": 1.0})
    yield own
    LocalFleet(own).stop_all()


def test_scale_starts_keeps_and_stops_workers(fleet_settings):
    fleet = LocalFleet(fleet_settings)
    done = fleet.scale({"decode": 2, "flow": 1})
    assert done["decode"] == {"wanted": 2, "started": ["worker-decode-0", "worker-decode-1"], "stopped": [],
                              "running": 2}
    assert done["flow"]["started"] == ["worker-extract-flow-0"]
    pids = {name: fleet.processes.table.record(name).pid for name in ("worker-decode-0", "worker-decode-1")}
    # the same counts again: nothing starts, nothing stops (the next run reuses the workers)
    again = fleet.scale({"decode": 2, "flow": 1})
    assert again["decode"]["started"] == [] and again["decode"]["stopped"] == []
    assert {name: fleet.processes.table.record(name).pid for name in pids} == pids
    # down to one: the highest-numbered goes; a killed worker is replaced on the next ensure
    down = fleet.scale({"decode": 1, "flow": 0})
    assert down["decode"]["stopped"] == ["worker-decode-1"] and down["flow"]["stopped"] == ["worker-extract-flow-0"]
    assert fleet.running("decode") == ["worker-decode-0"] and fleet.running("flow") == []
    fleet.processes.table.stop(worker_name("decode", 0))
    assert fleet.scale({"decode": 1})["decode"]["started"] == ["worker-decode-0"]
    assert sorted(fleet.stop_all()) == ["worker-decode-0"]


def test_a_trainer_that_cannot_start_is_reported_with_its_log(fleet_settings):
    # no spec.json in S3 for this run: the trainer exits at once, and the ensure step says why
    with pytest.raises(FleetError, match="trainer-no-such-run-rgb exited while starting") as caught:
        ensure_workers(fleet_settings, "no-such-run", ["rgb"], {"decode": 1, "rgb": 1})
    assert "no-such-run" in str(caught.value)
    assert release_workers(fleet_settings, "no-such-run", ["rgb"], data_workers={"decode": 0, "rgb": 0}) == {
        "mode": "local", "trainers": {"rgb": False},
        "workers": {"decode": {"wanted": 0, "started": [], "stopped": ["worker-decode-0"], "running": 0},
                    "rgb": {"wanted": 0, "started": [], "stopped": ["worker-extract-rgb-0"], "running": 0}}}


@pytest.mark.parametrize(("replicas", "message"), [
    ({"decode": 0, "rgb": 1}, "replicas.decode: a run needs at least one decode worker"),
    ({"decode": 1, "rgb": 0}, "replicas.rgb: the run trains stream 'rgb'"),
    ({"decode": 1, "rgb": 1, "audio": 2}, "replicas: 'audio' is not a worker kind"),
    ({"decode": 1, "rgb": -1}, "replicas.rgb: the run trains stream"),
    ({"decode": 1, "rgb": 1, "flow": 1000}, "replicas.flow: 1000 is not a number of workers"),
])
def test_bad_counts_are_refused_before_anything_starts(fleet_settings, replicas, message):
    with pytest.raises(FleetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ensure_workers(fleet_settings, "r1", ["rgb"], replicas)
    assert LocalFleet(fleet_settings).running("decode") == []
