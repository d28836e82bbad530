"""Built-in experiment trackers, as trainer callbacks a config enables by name: tensorboard and mlflow.

``tensorboard`` writes every metrics record the trainer logs (loss, lr, grad norm,
tokens/s, each mixture term's ``loss/NAME``, the ``eval/*`` values) as scalars at
its step, under ``output_dir/tensorboard`` unless ``log_dir`` says otherwise::

    callbacks:
      - {name: tensorboard}             # then: tensorboard --logdir runs/fkl/tensorboard

A resumed run purges the events past the step it resumes from, and a fresh start
(``resume: never``, or a run killed before its first checkpoint started over)
removes the replaced run's event files, so the curves show each step once, as
metrics.jsonl does. Only the tracker's own files go: the event files whose names
end in a suffix it recorded for this run in ``output_dir/tensorboard_run.json``
before writing them (and, in the default ``output_dir/tensorboard``, every event
file), never anything else in a ``log_dir`` of your own. It needs the optional
``tensorboard`` package (``pip install "distillzoo[tensorboard]"``). Without the
package, the config is refused before any model loads.

``mlflow`` logs the same records as MLflow metrics at their steps, and the whole
config (flattened: ``objective.name``, ``train.lr``, ...) as the run's params, to
``tracking_uri``: by default ``$MLFLOW_TRACKING_URI`` or else a local SQLite store,
``sqlite:///OUTPUT_DIR/mlflow.db`` (MLflow's default kind of store; nothing leaves
the machine)::

    callbacks:
      - {name: mlflow, experiment: distill-7b}   # then: mlflow ui --backend-store-uri sqlite:///runs/fkl/mlflow.db

A resumed run continues as a new MLflow run holding the old one's history up to
the checkpoint it resumes from, and the old one is deleted, so the active run has
each step once. ``output_dir/mlflow_run.json`` records which run that is. It needs
``pip install "distillzoo[mlflow]"`` (mlflow-skinny, and SQLAlchemy and alembic for
the SQLite store).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
import uuid
from pathlib import Path

from distillzoo.atomic import write_text_atomically
from distillzoo.training.callbacks import Callback
from distillzoo.errors import ConfigError
from distillzoo.hooks.hookspecs import hookimpl


class TensorBoard(Callback):
    """Scalars of each logged metrics record, through ``torch.utils.tensorboard.SummaryWriter``."""

    #: event file names: ``events.out.tfevents.TIME.HOST.PID.N``, then the tracker's suffix
    EVENTS = "events.out.tfevents.*"

    def __init__(self, log_dir: str | None = None) -> None:
        try:
            import tensorboard  # noqa: F401  (SummaryWriter needs it; fail here, before any model loads)
        except ImportError:
            raise ConfigError("callback 'tensorboard' needs the tensorboard package: "
                              "pip install \"distillzoo[tensorboard]\"") from None
        self.log_dir, self.writer = log_dir, None

    def on_train_start(self, run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        output_dir = Path(run.cfg.output_dir)
        default = output_dir / "tensorboard"
        log_dir = Path(self.log_dir) if self.log_dir else default
        record = output_dir / "tensorboard_run.json"
        written = _read_record(record)
        key = str(log_dir.resolve())
        suffixes = written.get(key, [])
        start = int(run.extra.get("step", 0))
        if not start:  # a fresh start: the run it replaces logged its steps too, so its event files go
            stale = [p for suffix in suffixes for p in log_dir.glob(self.EVENTS + suffix)]
            if log_dir.resolve() == default.resolve():  # the tracker's own directory: every event file in it
                stale += log_dir.glob(self.EVENTS)
            for path in stale:
                path.unlink(missing_ok=True)
            suffixes = []
        suffix = f".distillzoo-{uuid.uuid4().hex[:12]}"
        # recorded before the file exists, so a run killed at any point leaves none unaccounted for
        written[key] = [*suffixes, suffix]
        write_text_atomically(record, json.dumps({"log_dirs": written}, indent=1) + "\n")
        # purge_step drops what a killed run wrote past the checkpoint this one resumes from
        self.writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start else None, filename_suffix=suffix)

    def on_log(self, step: int, record: dict) -> None:
        for key, value in _numbers(record).items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # on disk as soon as metrics.jsonl is, so a run that stops loses nothing

    def on_train_end(self, result) -> None:
        if self.writer is not None:
            self.writer.close()


#: the suffix of a TensorBoard tracker's event file names: one per run and resume
_SUFFIX = re.compile(r"\.distillzoo-[0-9a-f]{12}")


def _read_record(path: Path) -> dict[str, list[str]]:
    """``{log dir: [suffix, ...]}`` of ``tensorboard_run.json``: whose event files are this run's ({} if none)."""
    try:
        found = json.loads(path.read_text(encoding="utf-8"))["log_dirs"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # none yet, or unreadable: no file is known to be the tracker's, so none is removed
    if not isinstance(found, dict):
        return {}
    return {str(k): [s for s in v if isinstance(s, str) and _SUFFIX.fullmatch(s)]
            for k, v in found.items() if isinstance(v, list)}


def _numbers(record: dict) -> dict[str, float]:
    """The finite numbers of a metrics record, step excluded: what a tracker can plot."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)}


def _mlflow_name(key: str) -> str:
    """A metric or param name MLflow accepts: ``objectives[0].name`` -> ``objectives.0.name``, ``#`` -> ``_``."""
    return re.sub(r"[^\w\-. :/]", "_", re.sub(r"\[(\d+)\]", r".\1", key))


class MLflow(Callback):
    """MLflow metrics of each logged metrics record and the config as params, through ``MlflowClient``."""

    #: MLflow's batch limits (metrics and params per log_batch call)
    BATCH = 100

    def __init__(self, tracking_uri: str | None = None, experiment: str = "distillzoo",
                 run_name: str | None = None) -> None:
        if importlib.util.find_spec("mlflow") is None:
            raise ConfigError('callback \'mlflow\' needs the mlflow package: pip install "distillzoo[mlflow]"')
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if (uri is None or uri.startswith("sqlite:")) and importlib.util.find_spec("sqlalchemy") is None:
            raise ConfigError("callback 'mlflow': a SQLite store needs SQLAlchemy and alembic: "
                              'pip install "distillzoo[mlflow]"')
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.client = self.run_id = None

    def on_train_start(self, run) -> None:
        from mlflow.tracking import MlflowClient

        output_dir = Path(run.cfg.output_dir)
        record = output_dir / "mlflow_run.json"
        self.uri = self.uri or f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=self.uri)
        found = self.client.get_experiment_by_name(self.experiment)
        experiment = found.experiment_id if found is not None else self.client.create_experiment(self.experiment)
        start = int(run.extra.get("step", 0))
        previous = json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None
        if previous is not None and previous.get("tracking_uri") != self.uri:
            previous = None  # the killed run logged elsewhere: nothing here to carry over
        tags = {"distillzoo.output_dir": str(output_dir)}
        if start and previous is not None:
            tags["distillzoo.resumed_from_run"] = previous["run_id"]
        self.run_id = self.client.create_run(experiment, run_name=self.run_name or output_dir.name,
                                             tags=tags).info.run_id
        from mlflow.entities import Param

        from distillzoo.config import flatten

        params = [Param(_mlflow_name(key)[:250], str(value)[:6000]) for key, value in flatten(run.cfg).items()]
        for i in range(0, len(params), self.BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.BATCH])
        if previous is not None:
            if start:  # carry the history the resumed run keeps, up to its checkpoint
                self._log([m for key in self.client.get_run(previous["run_id"]).data.metrics
                           for m in self.client.get_metric_history(previous["run_id"], key) if m.step <= start])
            self.client.delete_run(previous["run_id"])  # a fresh start or a resume replaces it
        write_text_atomically(record, json.dumps({"tracking_uri": self.uri, "run_id": self.run_id}) + "\n")

    def on_log(self, step: int, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log([Metric(_mlflow_name(key), value, now, step) for key, value in _numbers(record).items()])

    def _log(self, metrics: list) -> None:
        for i in range(0, len(metrics), self.BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.BATCH])

    def on_train_end(self, result) -> None:
        if self.client is not None:
            self.client.set_terminated(self.run_id, "FINISHED")


@hookimpl
def register_trainer_callbacks(register) -> None:
    register("tensorboard", TensorBoard, summary="TensorBoard scalars of every logged metrics record "
                                                 "(needs distillzoo[tensorboard])")
    register("mlflow", MLflow, summary="MLflow metrics of every logged metrics record and the config as params, "
                                       "in a local SQLite store by default (needs distillzoo[mlflow])")
