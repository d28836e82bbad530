"""The training loop of ``distillzoo train``: every algorithm, one loop.

Read top to bottom: the run spec (the config resolved and checked by
:mod:`distillzoo.training.spec` before any model loads), the output directory,
data streams, models, the algorithm's preparation, optimiser and schedule, resume,
then the loop. What a step computes belongs to the training algorithm the config
selects (:mod:`distillzoo.training.algorithm`; built-ins in
``distillzoo.plugins.algorithms``: ``distill``, ``preference``, ``dpkd``); this loop
owns everything they share and special-cases none of them.

Each optimiser step takes ``train.batch_size`` examples (split over ranks and
micro-batches). The algorithm turns this rank's examples into micro-batches, each
with a count (valid tokens, or pairs); the counts are summed over micro-batches
and ranks before the first backward, and the loss of every micro-batch, summed
over its units, is divided by that global count, so accumulation and ranks weigh
every unit alike. The loss is the forward of one module,
:class:`~distillzoo.training.algorithm.Models`, that holds student, teacher and reference.

Under ``torchrun`` that module is wrapped in DDP (``train.parallel: ddp``; teacher
and reference are neither broadcast nor reduced) or sharded with FSDP2
(``train.parallel: fsdp``: ``fully_shard`` on every decoder layer of each model,
the rest in the root unit; see :mod:`distillzoo.training.parallel`).
``train.precision`` picks bf16 autocast (the default on CUDA) or fp32 (the default
on CPU).

Checkpoints (``train.checkpoint_every``, :mod:`distillzoo.training.checkpoint`) hold
the weights, the optimiser, schedule, data order, the algorithm's state and RNG
states; they are written under a temporary name and renamed, and ``resume: auto``
continues from the newest one, giving the weights an uninterrupted run would have
reached. The final student is saved with ``save_pretrained`` under
``output_dir/final``. Callbacks a config enables (``callbacks:``) are called at
start, at each logged step, after each evaluation and checkpoint, and at the end.
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from distillzoo.errors import NonFiniteError, ServerError
from distillzoo.models.causal_lm import model_from_config, model_given
from distillzoo.training import checkpoint, lora, parallel
from distillzoo.training.algorithm import Models, Run
from distillzoo.training.callbacks import Callbacks
from distillzoo.training.run_dir import RunDir
from distillzoo.training.spec import RunSpec, resolve
from distillzoo.training.streams import MixedStreams, Stream


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    final_loss: float


def train(cfg: DictConfig | RunSpec, where: str = "<config>") -> TrainResult:
    """Resolve the config (every check, before any model loads), take the output directory (one run at a
    time), and run the loop."""
    spec = cfg if isinstance(cfg, RunSpec) else resolve(cfg, where)
    with RunDir(spec.output_dir, int(os.environ.get("RANK", "0")), spec.where).owned() as run_dir:
        try:
            return _loop(spec, run_dir)
        finally:
            spec.algorithm.close()


def _loop(spec: RunSpec, run_dir: RunDir) -> TrainResult:
    t, algorithm = spec.train, spec.algorithm
    world = spec.world_size
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    parallel.start(distributed)
    device = parallel.device()
    per_rank = t.batch_size // world
    micro = t.micro_batch_size or per_rank
    callbacks = Callbacks(spec.callbacks, rank)

    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    np.random.seed(spec.seed)
    streams = MixedStreams([Stream(s.name, d, s.repeat, s.weight) for s, d in zip(spec.streams, spec.datasets)],
                           seed=spec.seed, samples_per_epoch=spec.data.samples_per_epoch, rank=rank, world_size=world)
    eval_set = spec.eval_dataset

    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    fsdp = distributed and t.parallel == "fsdp"
    student = model_from_config(spec.student, "student")
    if spec.lora is not None:
        student = lora.apply(student, spec.lora, spec.seed)
    datasets = spec.datasets + ([eval_set] if eval_set is not None else [])
    run = Run(spec.config, spec.where, spec.tokenizer, device, rank, world, datasets,
              student=student.to(device).train(), spec=spec)
    for role in algorithm.roles(spec):
        if model_given(spec[role]):
            setattr(run, role, model_from_config(spec[role], role).to(device).eval().requires_grad_(False))
    algorithm.prepare(run)
    student = run.student
    models = Models(student, run.teacher, run.reference, algorithm, bf16)
    step_of = parallel.wrap(models, distributed, fsdp)
    trainable = [p for p in student.parameters() if p.requires_grad]  # a LoRA student: its adapters
    run.call = lambda fn: step_of(call=fn)  # the models used as the loss uses them: inside the wrapper's forward
    run.peek = lambda ahead: streams.peek(per_rank, ahead)
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay, fused=not fsdp)
    step = 0
    resumed = run_dir.start(spec.config, spec.resume)  # the newest intact checkpoint of this same run, or a fresh start
    if resumed is not None:
        path, state = resumed
        step = checkpoint.restore(state, student, optimizer, streams, algorithm, rank)
        if rank == 0:
            run_dir.truncate_metrics(step)
            print(f"resumed from {path} at step {step}", file=sys.stderr)
    run.extra["step"] = step
    callbacks.fire("on_train_start", run)

    bar = None
    if t.progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=t.steps, initial=step, desc=f"distillzoo train ({algorithm.name})", dynamic_ncols=True)
    loss_value = float("nan")
    while step < t.steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, t)
        algorithm.begin_step(step, t.steps)
        try:
            batches = algorithm.micro_batches(run, streams.take(per_rank), step, micro)
        except ServerError as e:  # the teacher server gave up after its retries: say what is safe on disk
            raise ServerError(f"{spec.where}: step {step + 1}: {e}. The student was not updated at this step and "
                              f"nothing more is saved ({_newest(run_dir)}); once the server answers again, rerun "
                              "with resume: auto") from None
        counts = parallel.all_reduce(torch.tensor([float(sum(b.count for b in batches)),
                                                   float(sum(b.tokens for b in batches))], dtype=torch.float64),
                                     distributed)
        n_global, tokens = float(counts[0]), int(counts[1])
        sums: dict[str, torch.Tensor] = {}
        for i, b in enumerate(batches):
            with parallel.gradient_sync(step_of, i == len(batches) - 1, distributed):
                out = step_of(b)
                (out.value * (world / max(n_global, 1.0))).backward()
            _accumulate(sums, {"loss": out.value, **out.metrics})
        norm = parallel.full(torch.nn.utils.clip_grad_norm_(student.parameters(), t.max_grad_norm or float("inf")))
        means = parallel.global_means(sums, n_global, distributed)
        loss_value = means.pop("loss")
        _refuse_non_finite(loss_value, float(norm), step + 1, batches, run_dir, spec.where)  # before the weights move
        algorithm.end_step({"loss": loss_value, **means})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - started
        record = {"step": step, "loss": loss_value, "lr": lr_at(step - 1, t), "grad_norm": float(norm),
                  "tokens": tokens, "tokens_per_s": tokens / max(elapsed, 1e-9)}
        if algorithm.unit != "tokens":
            record[algorithm.unit] = int(n_global)
        record.update(means)
        if t.eval_every and eval_set is not None and (step % t.eval_every == 0 or step == t.steps):
            evaluated = evaluate(step_of, algorithm, run, eval_set, micro)
            record.update(evaluated)
            callbacks.fire("on_evaluate", step, evaluated)
        logged = bool(t.log_every) and (step % t.log_every == 0 or step == t.steps
                                        or any(k.startswith("eval/") for k in record))
        if logged and rank == 0:
            run_dir.append_metrics(record)
        if logged:
            callbacks.fire("on_log", step, record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(_progress(record, algorithm))
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < t.steps:
            path = checkpoint.save_checkpoint(run_dir, step, student, optimizer, streams, algorithm, distributed)
            callbacks.fire("on_checkpoint", step, path)
    if bar is not None:
        bar.close()
    weights = checkpoint.full_model_state(student) if fsdp else None
    run_dir.save_final(lambda tmp: checkpoint.save_pretrained(student, weights, tmp))
    if distributed:
        torch.distributed.barrier()
    result = TrainResult(run_dir.path, step, loss_value)
    callbacks.fire("on_train_end", result)
    return result


def lr_at(step: int, t) -> float:
    """Linear warmup to train.lr, then cosine decay to min_lr_ratio * lr at train.steps."""
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = (step - t.warmup_steps) / max(t.steps - t.warmup_steps, 1)
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


@torch.no_grad()
def evaluate(step_of, algorithm, run: Run, dataset, batch_size: int) -> dict:
    """The algorithm's held-out metrics over the whole of ``dataset``, each per unit: ``{"eval/<name>": value}``."""
    models = step_of.module if isinstance(step_of, torch.nn.parallel.DistributedDataParallel) else step_of
    was_training = models.student.training
    models.student.eval()
    sums: dict[str, torch.Tensor] = {}
    count = 0.0
    examples = [dataset[i] for i in range(len(dataset))]
    for b in algorithm.eval_batches(run, examples, batch_size):
        _accumulate(sums, step_of(b, evaluate=True).metrics)
        count += b.count
    out = {f"eval/{k}": float(v) / max(count, 1.0) for k, v in sums.items()}
    if run.spec.eval_decoding is not None:  # train.eval_answers: the student's own answers, scored
        from distillzoo.teacher.evaluation import evaluate as score_answers

        scores = run.call(lambda m: score_answers(m.student, run.tokenizer, run.spec.eval_prompts,
                                                  decoding=run.spec.eval_decoding, system=run.spec.data.system,
                                                  batch_size=batch_size, forced=False))
        out.update({f"eval/{k}": scores.mean(k) for k in scores.sums})
    models.student.train(was_training)
    return out


def _accumulate(sums: dict, values: dict) -> None:
    for key, value in values.items():
        value = value.detach().double().cpu()
        sums[key] = sums[key] + value if key in sums else value


def _refuse_non_finite(loss: float, norm: float, step: int, batches: list, run_dir: RunDir, where: str) -> None:
    """Stop before a non-finite loss or gradient reaches the weights; nothing after it is saved."""
    if math.isfinite(loss) and math.isfinite(norm):
        return
    ids = [i for b in batches for i in (b.inputs.get("ids") or getattr(b.inputs.get("batch"), "ids", None) or [])]
    raise NonFiniteError(f"{where}: step {step}: the loss is {loss} and the gradient norm {norm}; the student was not "
                         f"updated and nothing more is saved ({_newest(run_dir)}). This step's samples on this rank: {ids[:8]}{' ...' if len(ids) > 8 else ''}. A "
                         "diverging student (lower train.lr) or non-finite data are the usual causes")


def _newest(run_dir: RunDir) -> str:
    newest = run_dir.checkpoints()
    return f"the newest checkpoint, {newest[0]}, is intact" if newest else "no checkpoint yet"


def _progress(record: dict, algorithm) -> dict:
    """The progress bar's postfix: the loss, each mixture term's loss, the algorithm's chosen metrics, tokens/s."""
    shown = {"loss": f"{record['loss']:.4f}"}
    for key, value in record.items():
        if key.startswith("loss/") or key in algorithm.progress_metrics:
            shown[key.rpartition("/")[2] if key.startswith("loss/") else key] = f"{value:.4f}"
    shown["tok_s"] = f"{record['tokens_per_s']:.0f}"
    return shown
