"""Training algorithms: what one step of ``distillzoo train`` computes, as plugins.

The loop (:mod:`distillzoo.training.loop`) owns what every algorithm shares: data
streams, devices, DDP/FSDP2, bf16, micro-batches and the global normalisation,
the optimiser and schedule, checkpoints and exact resume, metrics, progress and
callbacks. An :class:`Algorithm` owns the step. It says:

* which records it reads: ``records`` (and ``eval_records`` for ``data.eval``),
  ``"instruction"`` (dolly, alpaca, chat, a ``distillzoo prepare`` directory) or
  ``"preference"`` (prompt / chosen / rejected);
* which models it needs besides the student: :meth:`Algorithm.roles`
  (``teacher``, ``reference``), and its config checks, :meth:`Algorithm.check`;
  both run before any model loads;
* what it prepares before the loop: :meth:`Algorithm.prepare` (a frozen copy of
  the student, a cache lookup, ...);
* how this rank's examples of one step become micro-batches, each with the count
  it adds to the step's normaliser (tokens, pairs): :meth:`Algorithm.micro_batches`;
* how one micro-batch becomes a loss summed over its units and metrics summed
  likewise: :meth:`Algorithm.loss`. The loop adds the sums of all micro-batches and
  ranks and divides by the step's global count, so every unit weighs the same.

``loss`` runs inside the forward of :class:`Models`, the one module the loop wraps
in DDP or shards with FSDP2, so lm_head weights are whole there and gradients are
reduced. It reads hidden states and heads through :meth:`Models.hidden` and
:meth:`Models.head`, which apply the run's precision.

An algorithm is a class registered through the ``register_algorithms`` hook and
selected by ``algorithm: {name: ..., params}`` in a config; without that section
the objective's ``default_algorithm`` is used (``distill`` for logit objectives,
``preference`` for dpo and simpo, ``dpkd`` for dpkd).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, NamedTuple

import torch
from torch import Tensor

from distillzoo.models.causal_lm import SequenceLogps, final_hidden, lm_head_weight, response_logps
from distillzoo.hooks.hookspecs import RECORDS

__all__ = ["RECORDS", "ROLES", "Algorithm", "MicroBatch", "Models", "Run", "StepLoss", "instruction_batches"]
ROLES = ("teacher", "reference")


@dataclass
class MicroBatch:
    """One micro-batch as an algorithm prepared it.

    ``inputs``: whatever :meth:`Algorithm.loss` reads (tensors already on the run's
    device). ``count``: this micro-batch's share of the step's normaliser, in the
    algorithm's ``unit`` (valid tokens, pairs); the loop sums it over micro-batches
    and ranks before the first backward. ``tokens``: tokens trained on, for tokens/s.
    """

    inputs: dict[str, Any]
    count: float
    tokens: int


class StepLoss(NamedTuple):
    """What :meth:`Algorithm.loss` returns: ``value`` summed over the micro-batch's units (with grad), and
    ``metrics`` (detached scalars), each summed over the same units; the loop divides both by the global count."""

    value: Tensor
    metrics: dict[str, Tensor]


@dataclass
class Run:
    """What an algorithm sees of the run: the config, the data, the models and where this process stands.

    ``spec`` is the :class:`~distillzoo.training.spec.RunSpec` the config resolved into
    (typed sections: ``spec.train``, ``spec.data``, ``spec.teacher``, ...); ``cfg`` is the
    config as loaded, for what records it. ``student``, ``teacher`` and ``reference`` are
    the plain modules (not wrapped in DDP or FSDP2; ``prepare`` may set ``reference``).
    ``datasets`` are the training streams' datasets, then ``data.eval``'s when there is one.

    Outside :meth:`Algorithm.loss`, run the models through ``run.call(fn)``: it
    calls ``fn(models)`` (a :class:`Models`) inside the forward of the module the loop
    wraps, as the loss is, so under FSDP2 the root unit (embeddings, final norms,
    lm_heads) is gathered and each decoder layer gathers itself. That is how an
    algorithm samples from the student in ``micro_batches``.
    """

    cfg: Any
    where: str
    tokenizer: Any
    device: torch.device
    rank: int
    world_size: int
    datasets: list
    student: torch.nn.Module
    teacher: torch.nn.Module | None = None
    reference: torch.nn.Module | None = None
    extra: dict = field(default_factory=dict)
    #: ``call(fn)``: ``fn(models)`` inside the wrapped module's forward (set by the loop)
    call: Callable[[Callable], Any] | None = None
    #: the resolved run spec (set by the loop)
    spec: Any = None
    #: ``peek(ahead)``: this rank's examples of the ``ahead``-th next step, the data order left as it is (set by
    #: the loop; what a prefetch of the teacher reads)
    peek: Callable[[int], list] | None = None

    @property
    def seed(self) -> int:
        return int(self.cfg.seed)


class Algorithm:
    """A training algorithm: one step of ``distillzoo train``. Subclass, set ``name``, implement :meth:`loss`.

    Built with the run's objective (every term with ``reduction="sum"``) and the
    params of the config's ``algorithm`` section, checked against :attr:`params`
    (the catalogue's parameter format: ``{name: {type, default, range|choices, doc}}``).
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    #: the paper the algorithm comes from: {title, authors, year, url}
    paper: ClassVar[dict] = {}
    params: ClassVar[dict[str, dict]] = {}
    #: objective kinds it trains ("logit", "preference")
    objective_kinds: ClassVar[tuple[str, ...]] = ("logit",)
    #: what ``MicroBatch.count`` counts; logged under this name when it is not "tokens"
    unit: ClassVar[str] = "tokens"
    #: metrics shown on the progress bar besides the loss and every "loss/<term>"
    progress_metrics: ClassVar[tuple[str, ...]] = ()
    #: the records it trains on and evaluates on (instance attributes may override, from params)
    records: str = "instruction"
    eval_records: str | None = None

    def __init__(self, objective, **params: Any) -> None:
        self.objective = objective
        for key, value in params.items():
            setattr(self, key, value)

    # ------------------------------------------------------------------ before any model loads
    # ``spec`` is the run's :class:`~distillzoo.training.spec.RunSpec` as it is being resolved: its typed
    # sections (``spec.teacher.cache``, ``spec.data.eval``, ``spec.train.parallel``, ...) are set.
    def roles(self, spec) -> dict[str, bool]:
        """The models besides the student, ``{role: required}``; optional ones load when the config names them."""
        return {}

    def check(self, spec, where: str) -> None:
        """Checks of this algorithm against the rest of the config (its own params are checked already against
        :attr:`params`); raise :class:`~distillzoo.ConfigError` naming the key."""

    def reads(self, spec) -> set[str]:
        """The ``teacher`` / ``reference`` sections it reads, models or caches (after :meth:`check`); the run
        spec refuses a section nothing reads. Default: the roles."""
        return set(self.roles(spec))

    # ------------------------------------------------------------------ before the loop
    def prepare(self, run: Run) -> None:
        """Once, after the models are built and before they are wrapped (and before a checkpoint loads)."""

    # ------------------------------------------------------------------ each step
    def micro_batches(self, run: Run, examples: list, step: int, size: int) -> list[MicroBatch]:
        """This rank's ``examples`` of step ``step`` as micro-batches of at most ``size`` examples."""
        raise NotImplementedError(f"{type(self).__name__} must implement micro_batches")

    def loss(self, models: "Models", batch: MicroBatch) -> StepLoss:
        """The loss of one micro-batch summed over its units, and metrics summed likewise."""
        raise NotImplementedError(f"{type(self).__name__} must implement loss")

    # ------------------------------------------------------------------ held-out data
    def eval_batches(self, run: Run, examples: list, size: int) -> list[MicroBatch]:
        """Micro-batches of ``data.eval`` examples; the default serves instruction records (no sampling)."""
        if (self.eval_records or self.records) != "instruction":
            raise NotImplementedError(f"{type(self).__name__} evaluates {self.eval_records} records: implement "
                                      "eval_batches and eval_loss")
        return instruction_batches(examples, size, run.tokenizer.pad_id, run.device)

    def eval_loss(self, models: "Models", batch: MicroBatch) -> StepLoss:
        """Held-out metrics summed over units, logged as ``eval/<name>`` per unit.

        The default, for instruction records: the student's NLL per response token
        (``nll``) and, with a teacher loaded, KL(teacher || student) per token
        (``kl_teacher_student``, full vocab, temperature 1), both fused.
        """
        from distillzoo.kernels import token_logprobs
        from distillzoo.objectives.registry import objective

        x = batch.inputs
        hs, ws = models.hidden(models.student, x["input_ids"], x["attention_mask"]), models.head(models.student)
        nll = -token_logprobs(hs, ws, x["targets"]).double().sum()
        metrics = {"nll": nll}
        if models.teacher is not None:
            ht, wt = models.hidden(models.teacher, x["input_ids"], x["attention_mask"]), models.head(models.teacher)
            metrics["kl_teacher_student"] = objective("fkl", reduction="sum").from_hidden(hs, ws, ht, wt,
                                                                                        x["targets"]).double()
        return StepLoss(nll, metrics)

    # ------------------------------------------------------------------ training progress
    def begin_step(self, step: int, total_steps: int) -> None:
        """Before optimizer step ``step`` (0-based) of ``total_steps``: an objective that reads the step hears it."""
        if self.objective.wants_progress:
            self.objective.begin_step(step, total_steps)

    def end_step(self, losses: dict) -> None:
        """After the step, with its global mean losses (the same on every rank)."""
        if self.objective.wants_progress:
            self.objective.end_step(losses)

    # ------------------------------------------------------------------ state kept across steps
    def state_dict(self) -> dict:
        """What a checkpoint must hold for an exact resume (schedules, running statistics): by default the
        objective's schedule (:meth:`~distillzoo.objectives.logit.Objective.progress_state`), if it has one.
        A subclass that keeps its own state adds it to ``super().state_dict()``.

        Keep it the same on every rank (derive it from all-reduced values): rank 0's is saved.
        """
        progress = self.objective.progress_state() if self.objective.wants_progress else {}
        return {"objective": progress} if progress else {}

    def load_state_dict(self, state: dict) -> None:
        if self.objective.wants_progress and state.get("objective"):
            self.objective.load_progress_state(state["objective"])

    def close(self) -> None:
        """When the run ends, finished or stopped by an error: let go of what the algorithm holds (a teacher
        server's client and what it fetched ahead); default nothing."""

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={getattr(self, k)!r}" for k in self.params)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


def instruction_batches(examples: list[dict], size: int, pad_id: int, device) -> list[MicroBatch]:
    """Instruction examples (``input_ids``, ``loss_mask``, ``id``) as right-padded micro-batches of ``size``.

    Inputs: ``input_ids``, ``attention_mask`` ``[B, T]``, ``targets`` ``[B, T-1]`` (the
    next token where the loss is taken, else ``IGNORE_INDEX``) and ``ids``; the count is
    the number of targets.
    """
    from distillzoo.data.records import IGNORE_INDEX
    from distillzoo.data.shards import collate_sft

    out = []
    for start in range(0, len(examples), size):
        b = collate_sft(examples[start:start + size], pad_id, device)
        n = int((b["targets"] != IGNORE_INDEX).sum())
        out.append(MicroBatch({k: b[k] for k in ("input_ids", "attention_mask", "targets", "ids")}, n, n))
    return out


class Models(torch.nn.Module):
    """Student, teacher and reference as one module whose forward is the algorithm's loss.

    The loop wraps this module in DDP (the frozen teacher and reference neither
    broadcast nor reduced) or shards it with FSDP2; ``forward(batch)`` calls
    ``algorithm.loss(self, batch)`` (``evaluate=True``: ``eval_loss``). With ``bf16``
    the decoders run under autocast and the heads take bf16 operands (accumulating
    in fp32); the fp32 weights stay the master copy.
    """

    def __init__(self, student, teacher, reference, algorithm: Algorithm, bf16: bool) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.reference = reference
        self.algorithm = algorithm
        self.bf16 = bf16

    def hidden(self, model, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """``[B, T-1, H]`` final hidden states, row ``t`` scoring token ``t + 1`` (the lm_head's input)."""
        with torch.autocast(input_ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            h = final_hidden(model, input_ids, attention_mask)[:, :-1]
        return h.to(torch.bfloat16) if self.bf16 else h

    def head(self, model) -> Tensor:
        """The ``[V, H]`` lm_head weight in the precision the loss takes it."""
        w = lm_head_weight(model)
        return w.to(torch.bfloat16) if self.bf16 else w

    def sequence_logps(self, model, batch) -> SequenceLogps:
        """Summed response log-probs ``[2B]`` of a preference batch (chosen rows first), fused, in the run's
        precision: :func:`~distillzoo.models.causal_lm.response_logps` on :meth:`hidden` and :meth:`head`."""
        hidden = self.hidden(model, batch.input_ids, batch.attention_mask)
        return response_logps(hidden, self.head(model), batch.labels[:, 1:])

    def forward(self, batch: MicroBatch | None = None, evaluate: bool = False, call: Callable | None = None):
        """The algorithm's loss of ``batch`` (``evaluate``: its held-out metrics); or ``call(self)`` (see
        :attr:`Run.call`)."""
        if call is not None:
            return call(self)
        return (self.algorithm.eval_loss if evaluate else self.algorithm.loss)(self, batch)

    def frozen(self) -> list[str]:
        """Names of the teacher's and reference's parameters and buffers (DDP leaves them alone)."""
        names = []
        for role in ROLES:
            model = getattr(self, role)
            if model is not None:
                names += [f"{role}.{n}" for n, _ in [*model.named_parameters(), *model.named_buffers()]]
        return names
