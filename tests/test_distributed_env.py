"""`struprune prune` under a launcher's variables that cannot form a process group: refused at once
with one line naming the problem and the fix (exit 2), never a silent wait for processes that do
not exist. torch's own env:// rendezvous waits 30 minutes for them; every case that could wait
runs in a subprocess with a timeout, so a regression fails here instead of hanging the suite.

The subprocess scenarios start together (module fixture) because each spends most of its time
importing torch; a small STRUPRUNE_RENDEZVOUS_TIMEOUT keeps the deliberate waits short."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch.distributed as dist

from struprune_plugin.cli import main
from struprune_plugin.distributed import DEFAULT_RENDEZVOUS_TIMEOUT, Launch, launch_env
from struprune_plugin.errors import DistributedSetupError

LAUNCH_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "STRUPRUNE_RENDEZVOUS_TIMEOUT",
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RESTART_COUNT",
)
PRUNE = ["prune", "--model", "tiny", "--method", "magnitude", "--sparsity", "0.2", "--no-eval"]
PRUNE += ["--calib-samples", "4", "--calib-len", "64", "--no-progress"]
#: Far above the few seconds each case takes (torch's import included, on a busy machine), far
#: below the half hour a process waiting for absent peers would take.
HANG = 240
SHORT_WAIT = "2"  # seconds: STRUPRUNE_RENDEZVOUS_TIMEOUT where a peer is deliberately absent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full(**overrides: str) -> dict[str, str]:
    """A complete, valid two-process environment for RANK 0, with `overrides`."""
    env = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    return {**env, **overrides}


# --- the variables alone (no sockets, so nothing here can wait) ----------------------------------


@pytest.mark.parametrize("environ", [{}, {"WORLD_SIZE": ""}, {"WORLD_SIZE": "1"}, _full(WORLD_SIZE="1")])
def test_no_group_is_asked_for(environ):
    assert launch_env(environ) is None


def test_a_valid_launch_is_read():
    launch = launch_env(
        _full(RANK="1", LOCAL_RANK="1", TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="3")
    )
    assert launch == Launch(
        world_size=2,
        rank=1,
        local_rank=1,
        master_addr="127.0.0.1",
        master_port=29500,
        timeout=DEFAULT_RENDEZVOUS_TIMEOUT,
        agent_store=True,
        attempt="3",
    )
    assert launch_env(_full(STRUPRUNE_RENDEZVOUS_TIMEOUT="2.5")).timeout == 2.5


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 is below 1"),
        ({"WORLD_SIZE": "-2"}, "WORLD_SIZE=-2 is below 1"),
        ({"WORLD_SIZE": "1_0"}, "WORLD_SIZE='1_0' is not a whole number"),  # int() would take it as 10
        ({"WORLD_SIZE": "\u0662"}, "is not a whole number"),  # an Arabic-Indic 2, which int() takes
        ({"WORLD_SIZE": "2\nRANK=0"}, "WORLD_SIZE='2\\nRANK=0' is not a whole number"),
        ({"WORLD_SIZE": "x" * 10_000}, "WORLD_SIZE='xxxx"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK is not set"),
        (_full(RANK="x"), "RANK='x' is not a whole number"),
        (_full(RANK="-1"), "RANK=-1 is below 0"),
        (_full(RANK="5"), "RANK=5 is outside 0..1 for WORLD_SIZE=2"),
        (_full(WORLD_SIZE="1", RANK="1"), "RANK=1 is outside 0..0 for WORLD_SIZE=1"),
        (_full(LOCAL_RANK="zz"), "LOCAL_RANK='zz' is not a whole number"),
        (_full(LOCAL_RANK="-1"), "LOCAL_RANK=-1 is below 0"),
        (_full(LOCAL_RANK="2"), "LOCAL_RANK=2 is outside 0..1"),
        (_full(MASTER_ADDR=""), "MASTER_ADDR is not set"),
        (_full(MASTER_ADDR="node 1"), "MASTER_ADDR='node 1' is not a host name or IP address"),
        (_full(MASTER_ADDR="a\nb"), "MASTER_ADDR='a\\nb' is not a host name"),
        (_full(MASTER_ADDR="h" * 300), "MASTER_ADDR='hhh"),
        (_full(MASTER_PORT=""), "MASTER_PORT is not set"),
        (_full(MASTER_PORT="http"), "MASTER_PORT='http' is not a whole number"),
        (_full(MASTER_PORT="0"), "MASTER_PORT=0 is below 1"),  # rank 0 would listen on a random port
        (_full(MASTER_PORT="70000"), "MASTER_PORT=70000 is not a TCP port"),
        (_full(STRUPRUNE_RENDEZVOUS_TIMEOUT="abc"), "STRUPRUNE_RENDEZVOUS_TIMEOUT='abc'"),
        (_full(STRUPRUNE_RENDEZVOUS_TIMEOUT="0"), "STRUPRUNE_RENDEZVOUS_TIMEOUT='0'"),
        (_full(STRUPRUNE_RENDEZVOUS_TIMEOUT="-5"), "STRUPRUNE_RENDEZVOUS_TIMEOUT='-5'"),
        (_full(STRUPRUNE_RENDEZVOUS_TIMEOUT="nan"), "STRUPRUNE_RENDEZVOUS_TIMEOUT='nan'"),
        (_full(STRUPRUNE_RENDEZVOUS_TIMEOUT="inf"), "STRUPRUNE_RENDEZVOUS_TIMEOUT='inf'"),
        (_full(STRUPRUNE_RENDEZVOUS_TIMEOUT="1e300"), "STRUPRUNE_RENDEZVOUS_TIMEOUT='1e300'"),
    ],
)
def test_inconsistent_variables_are_refused_in_one_line(environ, needle):
    with pytest.raises(DistributedSetupError) as caught:
        launch_env(environ)
    message = str(caught.value)
    assert needle in message
    assert "\n" not in message and len(message) < 600
    assert message.count("Fix: ") == 1 and message.index("Fix: ") > message.index(needle)


# --- the CLI, in this process: only cases that failed fast even before the checks --------------


@pytest.mark.parametrize(
    "environ, needle",
    [
        ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK is not set"),
        ({"WORLD_SIZE": "2", "RANK": "x"}, "RANK='x' is not a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK=-1 is below 0"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
    ],
)
def test_cli_refuses_bad_variables_with_exit_2(environ, needle, monkeypatch, tmp_path, capsys):
    for name in LAUNCH_VARS:  # no MASTER_ADDR / MASTER_PORT: nothing can start waiting
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("STRUPRUNE_CACHE", str(tmp_path / "cache"))
    assert main([*PRUNE, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [err.strip()]
    assert err.startswith("struprune: error: ") and needle in err and "Fix: " in err
    assert not (tmp_path / "out").exists()


# --- the CLI in subprocesses, started together: the cases that could wait -----------------------


@dataclass
class Outcome:
    returncode: int | None  # None: still running after HANG seconds (killed)
    stderr: str
    output: Path


def _launch(tmp_path: Path, name: str, environ: dict[str, str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", STRUPRUNE_CACHE=str(tmp_path / "cache"), **environ)
    return subprocess.Popen(
        [sys.executable, "-m", "struprune_plugin.cli", *PRUNE, "--output", str(tmp_path / name)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    tmp_path = tmp_path_factory.mktemp("launches")
    local = dict(MASTER_ADDR="127.0.0.1")
    # torchrun's agent serves the store (TORCHELASTIC_USE_AGENT_STORE=True): played by this test
    agent_port = _free_port()
    agent = dist.TCPStore(
        "127.0.0.1", agent_port, 2, is_master=True, timeout=timedelta(seconds=30), wait_for_workers=False
    )
    under_agent = dict(local, MASTER_PORT=str(agent_port), TORCHELASTIC_USE_AGENT_STORE="True")
    scenarios = {
        # rank 0 alone: it serves the store and waits for a rank 1 that never comes
        "peer-never-arrives": dict(
            local,
            WORLD_SIZE="2",
            RANK="0",
            MASTER_PORT=str(_free_port()),
            STRUPRUNE_RENDEZVOUS_TIMEOUT=SHORT_WAIT,
        ),
        # rank 1 alone: nothing serves the store
        "rank-0-never-arrives": dict(
            local,
            WORLD_SIZE="2",
            RANK="1",
            MASTER_PORT=str(_free_port()),
            STRUPRUNE_RENDEZVOUS_TIMEOUT=SHORT_WAIT,
        ),
        "rank-beyond-world": dict(local, WORLD_SIZE="2", RANK="5", MASTER_PORT=str(_free_port())),
        # two processes claim RANK 1 under the agent's store, and RANK 0 never comes
        "rank-1-a": dict(under_agent, WORLD_SIZE="2", RANK="1", STRUPRUNE_RENDEZVOUS_TIMEOUT=SHORT_WAIT),
        "rank-1-b": dict(under_agent, WORLD_SIZE="2", RANK="1", STRUPRUNE_RENDEZVOUS_TIMEOUT=SHORT_WAIT),
    }
    pair_port = str(_free_port())  # a correct two-process launch without torchrun: RANK 0 serves the store
    scenarios["pair-0"] = dict(local, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_PORT=pair_port)
    scenarios["pair-1"] = dict(local, WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_PORT=pair_port)
    start = time.monotonic()
    running = {name: _launch(tmp_path, name, environ) for name, environ in scenarios.items()}
    results = {}
    for name, proc in running.items():
        try:
            _, err = proc.communicate(timeout=max(HANG - (time.monotonic() - start), 1))
            results[name] = Outcome(proc.returncode, err, tmp_path / name)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            results[name] = Outcome(None, err, tmp_path / name)
    del agent
    return results


def _one_line_error(outcome: Outcome, *needles: str) -> str:
    assert outcome.returncode is not None, f"still waiting after {HANG} s: {outcome.stderr[-2000:]}"
    assert outcome.returncode == 2, outcome.stderr[-3000:]
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr[-3000:]  # no torch stack traces or socket warnings
    line = lines[0]
    assert line.startswith("struprune: error: ") and "Fix: " in line, line
    for needle in needles:
        assert needle in line, line
    return line


def test_rank_0_alone_gives_up_after_the_rendezvous_timeout(outcomes):
    _one_line_error(
        outcomes["peer-never-arrives"],
        f"only 1 of WORLD_SIZE=2 processes joined within {SHORT_WAIT} s; missing RANK 1",
        "STRUPRUNE_RENDEZVOUS_TIMEOUT",
    )


def test_a_rank_with_no_rank_0_gives_up_after_the_rendezvous_timeout(outcomes):
    _one_line_error(
        outcomes["rank-0-never-arrives"],
        "RANK 1 of WORLD_SIZE=2: nothing answered at MASTER_ADDR:MASTER_PORT",
    )


def test_a_rank_beyond_the_world_is_refused_before_waiting(outcomes):
    _one_line_error(outcomes["rank-beyond-world"], "RANK=5 is outside 0..1 for WORLD_SIZE=2")


def test_a_taken_rank_and_a_missing_rank_under_the_agents_store(outcomes):
    lines = sorted(
        _one_line_error(outcomes[name]) for name in ("rank-1-a", "rank-1-b")
    )  # which of the two checks in first depends on their start-up times
    assert "another process already joined as RANK=1" in lines[0], lines
    assert "only 1 of WORLD_SIZE=2 processes joined" in lines[1] and "missing RANK 0" in lines[1], lines


def test_two_processes_launched_by_hand_still_prune(outcomes):
    for name in ("pair-0", "pair-1"):
        outcome = outcomes[name]
        assert outcome.returncode == 0, f"{name}: {outcome.stderr[-3000:]}"
    report = json.loads((outcomes["pair-0"].output / "struprune_report.json").read_text())
    assert report["pruning"]["processes"] == 2
