"""Built-in experiment trackers, as trainer callbacks a config enables by name.

``tensorboard`` writes every metrics record the trainer logs (loss, lr, grad norm,
tokens/s, each mixture term's ``loss/NAME``, the ``eval/*`` values) as scalars at
its step, under ``output_dir/tensorboard`` unless ``log_dir`` says otherwise::

    callbacks:
      - {name: tensorboard}             # then: tensorboard --logdir runs/fkl/tensorboard

A resumed run purges the events past the step it resumes from, so the curves show
each step once, as metrics.jsonl does. It needs the optional ``tensorboard``
package (``pip install "distillzoo[tensorboard]"``). Without the package, the config
is refused before any model loads.
"""

from __future__ import annotations

import math
from pathlib import Path

from distillzoo.callbacks import Callback
from distillzoo.errors import ConfigError
from distillzoo.hookspecs import hookimpl


class TensorBoard(Callback):
    """Scalars of each logged metrics record, through ``torch.utils.tensorboard.SummaryWriter``."""

    def __init__(self, log_dir: str | None = None) -> None:
        try:
            import tensorboard  # noqa: F401  (SummaryWriter needs it; fail here, before any model loads)
        except ImportError:
            raise ConfigError("callback 'tensorboard' needs the tensorboard package: "
                              "pip install \"distillzoo[tensorboard]\"") from None
        self.log_dir, self.writer = log_dir, None

    def on_train_start(self, run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = Path(self.log_dir) if self.log_dir else Path(run.cfg.output_dir) / "tensorboard"
        start = int(run.extra.get("step", 0))
        # purge_step drops what a killed run wrote past the checkpoint this one resumes from
        self.writer = SummaryWriter(str(log_dir), purge_step=start + 1 if start else None)

    def on_log(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # on disk as soon as metrics.jsonl is, so a run that stops loses nothing

    def on_train_end(self, result) -> None:
        if self.writer is not None:
            self.writer.close()


@hookimpl
def register_trainer_callbacks(register) -> None:
    register("tensorboard", TensorBoard, summary="TensorBoard scalars of every logged metrics record "
                                                 "(needs distillzoo[tensorboard])")
