"""Run functions in forked children of a clean process that has imported the heavy modules once.

Starting a Python process that imports torch, transformers and distillzoo takes
seconds, which a comparison of many short runs would pay once per run. A
:class:`ForkServer` starts one process that imports (and warms) what the runs
need and computes nothing, then forks a child per job: each child starts with
everything imported, thread pools untouched (a fork of a process that has used
OpenMP can hang in the child, which is why the parent itself never forks), and
a memory and crash boundary of its own.

::

    with ForkServer(preload=["distillzoo.compare.runner:warm"]) as server:
        code = server.run("distillzoo.compare.runner:run_child", {"config": "..."}, log="run/train.log")

A job is a ``module:function`` called with JSON keyword arguments; its stdout and
stderr go to ``log`` and its exit code (0, or 1 if it raised) comes back. On
Linux the server and its children die with the process that started them, so a
killed parent leaves no orphan holding a run's lock.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

from distillzoo.errors import DistillzooError


def _call(target: str, kwargs: dict | None = None) -> Any:
    module, _, function = target.partition(":")
    obj = importlib.import_module(module)
    return getattr(obj, function)(**(kwargs or {})) if function else obj


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies (prctl PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _child(job: dict) -> None:
    """In the forked child: run the job with its output in its log, then exit (never returns)."""
    code = 1
    try:
        _die_with_parent()
        fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the job pipe is the server's
        os.close(null)
        _call(job["call"], job["kwargs"])
        code = 0
    except BaseException:  # noqa: BLE001  (everything is reported in the log and as the exit code)
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    """The server's main loop: a preload request, then one job per stdin line, one reply per job."""
    _die_with_parent()
    replies = sys.stdout
    sys.stdout = sys.stderr  # what a preloaded module prints must not corrupt the replies
    for target in json.loads(sys.stdin.readline())["preload"]:
        _call(target)
    replies.write(json.dumps({"ready": True}) + "\n")
    replies.flush()
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"exit": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


class ForkServer:
    """The parent's handle on a fork server (a context manager; started on first use)."""

    def __init__(self, preload: list[str]) -> None:
        self.preload = list(preload)
        self.process: subprocess.Popen | None = None

    def _start(self) -> subprocess.Popen:
        if self.process is None:
            self.process = subprocess.Popen(
                [sys.executable, "-c", "from distillzoo.compare.forkserver import serve; serve()"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
            self._send({"preload": self.preload})
            self._reply()
        return self.process

    def _send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def _reply(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            self.process = None
            raise DistillzooError(f"the fork server exited (code {code}) before it answered; its error is above")
        return json.loads(line)

    def run(self, target: str, kwargs: dict, log: str | Path) -> int:
        """Run ``module:function(**kwargs)`` in a forked child, its output in ``log``; its exit code."""
        self._start()
        self._send({"call": target, "kwargs": kwargs, "log": str(log)})
        return int(self._reply()["exit"])

    def close(self) -> None:
        if self.process is not None:
            self.process.stdin.close()
            self.process.wait()
            self.process.stdout.close()
            self.process = None

    def __enter__(self) -> "ForkServer":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is not None and self.process is not None:
            self.process.kill()  # interrupted: the running job goes with it
        self.close()
