"""PID files: `down` from another process stops exactly what was started, never a recycled PID."""

from __future__ import annotations

import json
import subprocess
import sys
import time

from essp.stack.procs import ProcessTable, pid_alive

STOP_FROM_ANOTHER_PROCESS = (
    "import sys; from pathlib import Path; from essp.stack.procs import ProcessTable; "
    "t = ProcessTable(Path(sys.argv[1])); print(t.record('sleeper') is not None, t.stop('sleeper'))"
)


def _stop_elsewhere(state_dir) -> str:
    done = subprocess.run([sys.executable, "-c", STOP_FROM_ANOTHER_PROCESS, str(state_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_stop_from_another_process_and_pid_reuse(tmp_path):
    table = ProcessTable(tmp_path)
    # exec renames the process (like Airflow's setproctitle): the start time still identifies it.
    record = table.spawn("sleeper", ["bash", "-c", "exec -a renamed-process sleep 60"])
    assert table.record("sleeper") == record and record.start_ticks is not None

    # A PID file whose start time does not match is a recycled PID: not ours, never signalled.
    data = json.loads(table.pidfile("sleeper").read_text())
    table.pidfile("sleeper").write_text(json.dumps({**data, "start_ticks": data["start_ticks"] + 1}))
    assert _stop_elsewhere(tmp_path) == "False False"
    assert pid_alive(record.pid)
    assert not table.pidfile("sleeper").exists()  # the stale file is dropped

    table.pidfile("sleeper").write_text(json.dumps(data))
    assert _stop_elsewhere(tmp_path) == "True True"
    deadline = time.monotonic() + 10
    while pid_alive(record.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(record.pid)
    assert table.record("sleeper") is None


# The main thread holds a stopping Event's lock (as inside Event.set or Event.wait) when SIGTERM comes,
# twice, as a DDP rank gets it (its process group's, then its supervisor's forward). A handler that
# set the Event itself would wait on that lock for ever; the process must stop within seconds.
SIGNAL_INSIDE_EVENT_SET = """
import os, signal, sys, threading, time
from essp.stack.procs import on_stop_signals
stopping = threading.Event()
calls = []
def stop():
    calls.append(threading.current_thread().name)
    stopping.set()
on_stop_signals(stop)
with stopping._cond:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)  # the handlers have run, in this thread, while it holds the lock
    assert not stopping.is_set()
assert stopping.wait(10), "stop() was never called"
time.sleep(0.2)
print(calls)
"""


def test_stop_signals_arriving_while_the_main_thread_holds_the_events_lock_stop_it_once():
    done = subprocess.run([sys.executable, "-c", SIGNAL_INSIDE_EVENT_SET], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['essp-stop-signal']"  # once, from its own thread
