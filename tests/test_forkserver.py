"""The fork server: each job in a child of a clean process, its output in its log, its exit code back."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distillzoo.compare.forkserver import ForkServer

HERE = Path(__file__).parent


# ---------------------------------------------------------------- jobs (imported by the server from this module)
def write_pid_and_matmul(out: str) -> None:
    import torch

    a = torch.randn(600, 600, generator=torch.Generator().manual_seed(0))
    value = float((a @ a).trace())  # the intra-op thread pool, in a child forked after the parent used it
    Path(out).write_text(f"{os.getpid()} {os.getppid()} {torch.get_num_threads()} {value!r}")
    print("printed by the job")


def fail(message: str) -> None:
    raise ValueError(message)


def exit_with(code: int) -> None:
    os._exit(code)


def sleep_and_write(out: str, seconds: float) -> None:
    Path(out).write_text(str(os.getpid()))
    time.sleep(seconds)


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    with ForkServer(preload=["torch"]) as s:
        yield s


def test_a_job_runs_in_a_forked_child_with_its_output_in_its_log(server, tmp_path):
    a = torch.randn(600, 600, generator=torch.Generator().manual_seed(0))
    expected = float((a @ a).trace())  # this process has used its thread pool: it must not be the one that forks
    for i in range(2):
        out, log = tmp_path / f"out{i}", tmp_path / f"log{i}"
        assert server.run("test_forkserver:write_pid_and_matmul", {"out": str(out)}, log) == 0
        pid, parent, threads, value = out.read_text().split()
        assert int(pid) != os.getpid() and int(parent) == server.process.pid  # a child of the server
        assert int(threads) == torch.get_num_threads() and float(value) == expected
        assert log.read_text() == "printed by the job\n"


def test_a_failing_job_gives_its_exit_code_and_traceback_and_the_server_goes_on(server, tmp_path):
    assert server.run("test_forkserver:fail", {"message": "bad input at row 3"}, tmp_path / "fail.log") == 1
    log = (tmp_path / "fail.log").read_text()
    assert "Traceback" in log and "ValueError: bad input at row 3" in log
    assert server.run("test_forkserver:exit_with", {"code": 3}, tmp_path / "exit.log") == 3
    assert server.run("test_forkserver:no_such_job", {}, tmp_path / "missing.log") == 1
    assert "AttributeError" in (tmp_path / "missing.log").read_text()
    assert server.run("test_forkserver:write_pid_and_matmul", {"out": str(tmp_path / "o")}, tmp_path / "ok.log") == 0


def test_killing_the_parent_kills_the_server_and_the_running_job(tmp_path):
    out = tmp_path / "job_pid"
    script = (f"import sys; sys.path.insert(0, {str(HERE)!r})\n"
              "from distillzoo.compare.forkserver import ForkServer\n"
              "s = ForkServer(preload=[])\n"
              f"s.run('test_forkserver:sleep_and_write', {{'out': {str(out)!r}, 'seconds': 120}}, {str(tmp_path / 'log')!r})\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    parent = subprocess.Popen([sys.executable, "-c", script], env=env)
    deadline = time.monotonic() + 60
    while not (out.is_file() and out.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    job = int(out.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(job) and time.monotonic() < deadline:
        time.sleep(0.1)
    if alive(job):
        os.kill(job, signal.SIGKILL)
        pytest.fail("the job outlived the process that started it")


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is dead: it holds no lock and runs nothing)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
