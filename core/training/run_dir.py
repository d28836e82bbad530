"""A training run's output directory: who owns it, what run it holds, and every file the run writes there.

::

    output_dir/
        .lock              held (flock) by the run that owns the directory; the OS drops it when that process dies
        run.json           what the run is: the config keys that matter for resuming it (see IGNORED)
        metrics.jsonl      one record per logged step, appended a line at a time
        checkpoints/step-00000100/state.pt   the two newest, each written under a temporary name and renamed
        final/             the student, save_pretrained, written the same way

Rules:

* one run at a time: a second ``distillzoo train`` on the directory is refused,
  naming the pid that holds it; a crashed run leaves no lock behind;
* ``resume: auto`` continues from the newest *intact* checkpoint (a damaged one is
  reported and the one before it used), and only when the config matches run.json in
  every key that matters; otherwise it is refused, naming the keys that differ;
* a directory with a run but no checkpoint is not silently appended to: a finished run
  (``final/``) is refused, an interrupted one with the same config starts over;
  ``resume: never`` replaces whatever is there;
* temporaries a killed run left behind are removed when the next run takes the lock;
* a write that fails (a full disk) says what it was writing and what is still intact.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from distillzoo.atomic import sweep_temporaries, write_dir_atomically, write_text_atomically
from distillzoo.config import flatten
from distillzoo.errors import ConfigError, DistillzooError

CHECKPOINT_PREFIX = "step-"
KEPT_CHECKPOINTS = 2
RUN_FORMAT = 1
#: config keys a resumed run may change: how long it runs, how often it logs, how it is laid out on devices
IGNORED = ("train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every", "train.progress",
           "train.parallel", "train.micro_batch_size", "callbacks", "resume", "output_dir", "data.eval", "generate",
           "score")


class WriteError(DistillzooError):
    """A file the run writes could not be written (a full disk, a read-only directory)."""


def check_writable(output_dir: str | Path, where: str) -> None:
    """A ConfigError unless ``output_dir`` is (or can be created as) a writable directory. Creates nothing."""
    path = Path(output_dir)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{where}: output_dir: {str(path)!r} cannot be created: {str(probe)!r} is a file, not a "
                          "directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: output_dir: {str(probe)!r} is not writable, so {str(path)!r} cannot be "
                          f"{'written' if probe == path else 'created'}")


def check_space(output_dir: str | Path, n_params: int, checkpoints: bool, where: str) -> None:
    """Refuse a run whose checkpoints and final student cannot fit on the disk (fp32 estimate). Creates nothing."""
    probe = Path(output_dir)
    while not probe.exists():
        probe = probe.parent
    weights = 4 * n_params
    needed = weights * (1 + (3 * (KEPT_CHECKPOINTS + 1) if checkpoints else 0))  # + Adam's moments; one in flight
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ConfigError(f"{where}: output_dir: {str(output_dir)!r} has {free / 2**30:.2f} GiB free but this "
                          f"run writes about {needed / 2**30:.2f} GiB (the final student"
                          + (f" and {KEPT_CHECKPOINTS} checkpoints of weights and optimizer state" if checkpoints
                             else "") + "); free space or choose another output_dir")


def identity(cfg) -> dict[str, Any]:
    """The config's keys that matter for resuming, flattened (``objective.name``, ``data.streams[0].path``, ...)."""
    return {key: value for key, value in flatten(cfg).items()
            if not any(key == k or key.startswith(k + ".") or key.startswith(k + "[") for k in IGNORED)}


class RunDir:
    """The output directory of one run, as the process of rank ``rank`` sees it (rank 0 writes)."""

    def __init__(self, path: str | Path, rank: int = 0, where: str = "<config>") -> None:
        self.path, self.rank, self.where = Path(path), rank, where
        self.checkpoints_dir = self.path / "checkpoints"
        self.metrics = self.path / "metrics.jsonl"
        self.final = self.path / "final"
        self.run_json = self.path / "run.json"

    # ------------------------------------------------------------------ ownership
    @contextlib.contextmanager
    def owned(self) -> Iterator["RunDir"]:
        """Hold the directory's lock (rank 0) for the run, and sweep what killed runs left behind."""
        if self.rank != 0:
            yield self
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            handle = open(self.path / ".lock", "a+", encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{self.where}: output_dir: cannot write to {str(self.path)!r} ({e})") from None
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise ConfigError(f"{self.where}: output_dir: {str(self.path)!r} is in use by another distillzoo "
                                  f"train ({holder}); wait for it, or give this run its own output_dir") from None
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            removed = sweep_temporaries(self.path, "final") + sweep_temporaries(self.path, "*.json*") \
                + sweep_temporaries(self.checkpoints_dir, f"{CHECKPOINT_PREFIX}*")
            if removed:
                print(f"removed {len(removed)} temporaries a killed run left in {self.path}: "
                      f"{', '.join(p.name for p in removed[:3])}{' ...' if len(removed) > 3 else ''}", file=sys.stderr)
            yield self
        finally:
            handle.close()  # drops the flock

    # ------------------------------------------------------------------ which run this is, and where it resumes
    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, newest first."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [p for p in self.checkpoints_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "state.pt").is_file()]
        return sorted(found, reverse=True)

    def start(self, cfg, resume: str) -> tuple[Path, dict] | None:
        """``(checkpoint, state)`` to resume from, or None for a fresh start (the directory made ready for it)."""
        mine = identity(cfg)
        if resume == "never":
            self._clear()
            self._write_identity(mine)
            return None
        for checkpoint in self.checkpoints():
            try:
                state = torch.load(checkpoint / "state.pt", weights_only=False, map_location="cpu")
                if not isinstance(state, dict) or not {"step", "model", "optimizer", "data", "rng"} <= state.keys():
                    raise ValueError("it lacks step, model, optimizer, data or rng state")
            except Exception as e:  # a torn or foreign file: fall back to the one before it
                print(f"checkpoint {checkpoint} is damaged ({type(e).__name__}: {str(e)[:200]}); trying the one "
                      "before it", file=sys.stderr)
                continue
            self._same_run(mine, f"resume from {checkpoint.name}")
            return checkpoint, state
        if self.checkpoints():
            raise ConfigError(f"{self.where}: resume: no intact checkpoint in {self.checkpoints_dir} (all are damaged); "
                              "set resume: never to start the run over")
        if self.final.exists():
            self._refuse_finished()
        if self.metrics.exists():  # a run killed before its first checkpoint: start it over, if it is this run
            self._same_run(mine, "start over the run killed before its first checkpoint")
        self._clear()
        self._write_identity(mine)
        return None

    def check_resumable(self, cfg, resume: str) -> None:
        """What :meth:`start` would refuse, found without loading or changing anything (``distillzoo check``, and
        ``train`` before its models load): a run of another config to resume or start over, a finished run."""
        if resume == "never" or not self.path.is_dir():
            return
        mine = identity(cfg)
        checkpoints = self.checkpoints()
        if checkpoints:
            self._same_run(mine, f"resume from {checkpoints[0].name}")
        elif self.final.exists():
            self._refuse_finished()
        elif self.metrics.exists():
            self._same_run(mine, "start over the run killed before its first checkpoint")

    def _refuse_finished(self) -> None:
        raise ConfigError(f"{self.where}: resume: {str(self.path)!r} holds a finished run (final/) and no "
                          "checkpoint to resume from; give this run another output_dir, or set resume: never to "
                          "replace that run")

    def _same_run(self, mine: dict, doing: str) -> None:
        try:
            theirs = json.loads(self.run_json.read_text(encoding="utf-8"))["config"]
        except FileNotFoundError:
            return  # a run from before run.json was kept: nothing to compare with
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{self.where}: resume: {self.run_json} is damaged ({e}); set resume: never to start "
                              "over") from None
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k, "<unset>") != theirs.get(k, "<unset>"))
        if differ:
            shown = "; ".join(f"{k}: {theirs.get(k, '<unset>')!r} there, {mine.get(k, '<unset>')!r} here"
                              for k in differ[:6])
            raise ConfigError(f"{self.where}: resume: cannot {doing}: {str(self.path)!r} holds a run with another "
                              f"config ({shown}{'; ...' if len(differ) > 6 else ''}). Give this run another "
                              "output_dir, or set resume: never to replace that run")

    def _clear(self) -> None:
        """A fresh start: the old run's checkpoints and metrics go (its final/ stays until the new one replaces it)."""
        if self.rank != 0:
            return
        shutil.rmtree(self.checkpoints_dir, ignore_errors=True)
        self.metrics.unlink(missing_ok=True)

    def _write_identity(self, mine: dict) -> None:
        if self.rank == 0:
            self._write("run.json", lambda: write_text_atomically(
                self.run_json, json.dumps({"distillzoo_run": RUN_FORMAT, "config": mine}, indent=1, default=str)))

    # ------------------------------------------------------------------ metrics
    def append_metrics(self, record: dict) -> None:
        """One line per record, written in one call; a line a crash cuts short is dropped by the next resume."""
        line = json.dumps(record) + "\n"
        self._write("metrics.jsonl", lambda: _append(self.metrics, line))

    def truncate_metrics(self, step: int) -> None:
        """Keep the records up to the resumed step; drop later ones and any line cut short (the rerun logs them)."""
        if not self.metrics.exists():
            return
        kept = []
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").split("\n"):
            try:
                record = json.loads(line)
            except ValueError:
                continue  # blank, or half-written by a crash or a full disk
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line)
        self._write("metrics.jsonl", lambda: write_text_atomically(self.metrics, "".join(l + "\n" for l in kept)))

    # ------------------------------------------------------------------ checkpoints and the final student
    def save_checkpoint(self, step: int, write: Callable[[Path], None]) -> Path:
        path = self.checkpoints_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
        if self.rank == 0:
            self._write(f"checkpoint {path.name}", lambda: write_dir_atomically(path, write))
            for old in self.checkpoints()[KEPT_CHECKPOINTS:]:
                shutil.rmtree(old, ignore_errors=True)
        return path

    def save_final(self, write: Callable[[Path], None]) -> None:
        if self.rank == 0:
            self._write("the final student (final/)", lambda: write_dir_atomically(self.final, write))

    def _write(self, what: str, write: Callable[[], None]) -> None:
        try:
            write()
        except OSError as e:
            intact = self.checkpoints()
            kept = f"the newest checkpoint, {intact[0]}, is intact: rerun with resume: auto once there is room" \
                if intact else "no checkpoint was written yet"
            reason = "the disk is full" if e.errno == errno.ENOSPC else f"{type(e).__name__}: {e}"
            raise WriteError(f"{self.where}: could not write {what} in {self.path} ({reason}); nothing half-written "
                             f"was left; {kept}") from None


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
