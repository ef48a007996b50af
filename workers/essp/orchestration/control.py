"""The stage of the `essp_control` DAG: pause, resume or stop a run. Every decode and extract worker and
the run's trainers obey; the run's state is kept in Redis for workers that start later."""

from __future__ import annotations

from typing import Any

from essp.dataplane.resident import publish_control
from essp.lifecycle.liveness import observe_pause
from essp.lifecycle.params import ControlParams
from essp.orchestration.stages import stage
from essp.settings import Settings


@stage
def control_run(settings: Settings, params: ControlParams) -> dict[str, Any]:
    """Send ``params.command`` for ``params.run``."""
    message = publish_control(settings, params.command, run=params.run)
    observe_pause(settings, params.run)  # a pause starts (or ends) in the run's pause ledger now
    return {"run": params.run, "command": params.command, "sent": message.model_dump(mode="json")}
