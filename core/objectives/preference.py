"""Sequence-level preference objectives: the base class the DPO family, SimPO and DPKD share.

A preference objective compares two responses to one prompt, chosen ``y_w`` and
rejected ``y_l``, through their summed log-probabilities under the policy
(``pi``, the student being trained) and, for most objectives, a frozen reference
(``rho``; for DPKD, the teacher)::

    loss_fn = dz.objective("dpo", beta=0.1, loss_type="sigmoid")
    loss = loss_fn(policy_chosen_logps, policy_rejected_logps,      # [B] each
                   reference_chosen_logps, reference_rejected_logps,
                   chosen_lengths=..., rejected_lengths=...)        # [B] response tokens

A subclass implements :meth:`PreferenceObjective.pair_losses` (per pair: loss and
the implicit rewards); the base owns input checks, length normalisation,
reductions and the per-call :attr:`~PreferenceObjective.metrics` that TRL users
know (``rewards/chosen``, ``rewards/margins``, ``rewards/accuracies``, ...).

Lengths are the number of response tokens (prompt and padding excluded) each
summed log-prob is over. Objectives that work on per-token averages (dpo's ipo,
simpo) divide by them; without lengths their inputs are taken to be averages
already, as TRL's ``dpo_loss`` and ``cpo_loss`` take them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from distillzoo.objectives.logit import Objective
from distillzoo.models.causal_lm import SequenceLogps, sequence_logps
from distillzoo.errors import ParameterError

PREFERENCE_REDUCTIONS = ("mean", "sum", "none")


@dataclass
class PairTerms:
    """What :meth:`PreferenceObjective.pair_losses` returns, each ``[B]``.

    ``chosen_rewards`` / ``rejected_rewards`` are the implicit rewards (for dpo
    ``beta * (log pi - log rho)``), detached, used for the metrics only.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    #: objective-specific batch metrics (e.g. ``nll_loss``), detached
    metrics: dict[str, Tensor] = field(default_factory=dict)


class PreferenceObjective(Objective):
    """A loss on chosen/rejected response log-probs of a policy (and a reference).

    Call it with ``[B]`` tensors (see the module docstring). ``reduction``: ``mean``
    over pairs (default), ``sum``, or ``none`` (per pair). After each call
    :attr:`metrics` holds detached batch means for logging.
    """

    kind: ClassVar[str] = "preference"
    default_algorithm: ClassVar[str] = "preference"
    #: False for reference-free objectives (simpo): their reference arguments must be None.
    needs_reference: ClassVar[bool] = True

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in PREFERENCE_REDUCTIONS:
            raise ParameterError(f"{self.name}: reduction {reduction!r} is not one of {list(PREFERENCE_REDUCTIONS)}")
        self.reduction = reduction
        self.metrics: dict[str, Tensor] = {}

    # ------------------------------------------------------------------ the one method
    def pair_losses(self, policy_chosen: Tensor, policy_rejected: Tensor, reference_chosen: Tensor | None,
                    reference_rejected: Tensor | None, chosen_lengths: Tensor | None,
                    rejected_lengths: Tensor | None, **extra: Tensor) -> PairTerms:
        """Per-pair losses ``[B]`` and implicit rewards from summed log-probs ``[B]`` (fp32 or float64).

        Lengths are ``[B]`` in the log-probs' dtype, or None (inputs already averaged).
        ``extra`` holds the keyword tensors an objective declares in :attr:`extra_inputs`.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement pair_losses")

    #: Names of extra per-pair keyword inputs the objective accepts (dpkd's ``reverse_kl``).
    extra_inputs: ClassVar[tuple[str, ...]] = ()

    def step_inputs(self, policy: "SequenceLogps", reference: "SequenceLogps | None", n_pairs: int, policy_model,
                    reference_model) -> dict[str, Tensor]:
        """The :attr:`extra_inputs` of one :func:`preference_step`, from its forward passes (default: none).

        ``policy`` / ``reference`` hold the ``[2B]`` log-probs and, on the fused path,
        the shifted hidden states and targets (chosen rows first); ``reference`` is
        None when the reference log-probs come from the batch (a cache).
        """
        return {}

    #: True for an objective whose :meth:`summed_logps` weighs tokens unequally (dpo's ``ld_alpha``)
    reweights_tokens: bool = False

    def summed_logps(self, seq: "SequenceLogps", n_pairs: int) -> Tensor:
        """The ``[2B]`` response log-probs the loss reads, from one forward pass's :class:`SequenceLogps` (chosen
        rows first): their plain sums by default."""
        return seq.logps

    # ------------------------------------------------------------------ what the base owns
    def forward(self, policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
                reference_chosen_logps: Tensor | None = None, reference_rejected_logps: Tensor | None = None, *,
                chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                **extra: Tensor) -> Tensor:
        """The loss from summed response log-probs ``[B]`` (fp32 result; float64 for float64 inputs)."""
        name = self.name or type(self).__name__
        unknown = set(extra) - set(self.extra_inputs)
        if unknown:
            raise ParameterError(f"{name}: unexpected input(s) {sorted(unknown)}"
                                 + (f"; it accepts {list(self.extra_inputs)}" if self.extra_inputs else ""))
        pc = _logps(name, "policy_chosen_logps", policy_chosen_logps, None)
        dtype = pc.dtype
        pr = _logps(name, "policy_rejected_logps", policy_rejected_logps, pc)
        if self.needs_reference:
            if reference_chosen_logps is None or reference_rejected_logps is None:
                raise ParameterError(f"{name} needs reference log-probs: reference_chosen_logps and "
                                     "reference_rejected_logps (from a reference model or a reference cache)")
            rc = _logps(name, "reference_chosen_logps", reference_chosen_logps, pc).detach()
            rr = _logps(name, "reference_rejected_logps", reference_rejected_logps, pc).detach()
        else:
            if reference_chosen_logps is not None or reference_rejected_logps is not None:
                raise ParameterError(f"{name} is reference-free: pass no reference log-probs")
            rc = rr = None
        cl = _lengths(name, "chosen_lengths", chosen_lengths, pc)
        rl = _lengths(name, "rejected_lengths", rejected_lengths, pc)
        if (cl is None) != (rl is None):
            raise ParameterError(f"{name}: give both chosen_lengths and rejected_lengths, or neither")
        extra = {k: _logps(name, k, v, pc).to(dtype) for k, v in extra.items()}
        terms = self.pair_losses(pc.to(dtype), pr.to(dtype), rc, rr, cl, rl, **extra)
        self.metrics = self._metrics(terms, pc, pr)
        if self.reduction == "none":
            return terms.losses
        return terms.losses.sum() if self.reduction == "sum" else terms.losses.mean()

    def _metrics(self, terms: PairTerms, policy_chosen: Tensor, policy_rejected: Tensor) -> dict[str, Tensor]:
        chosen, rejected = terms.chosen_rewards.detach(), terms.rejected_rewards.detach()
        out = {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).to(chosen.dtype).mean(),
            "logps/chosen": policy_chosen.detach().mean(),
            "logps/rejected": policy_rejected.detach().mean(),
        }
        out.update({k: v.detach() for k, v in terms.metrics.items()})
        return out

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


@dataclass
class PreferenceStep:
    """The result of :func:`preference_step`: the loss (with grad) and detached metrics."""

    loss: Tensor
    metrics: dict[str, Tensor]


def preference_step(objective: PreferenceObjective, policy, batch, reference=None, *, fused: bool = True,
                    chunk_size: int | None = None) -> PreferenceStep:
    """One preference loss on a :class:`~distillzoo.data.records.PreferenceBatch`: forward passes, loss, metrics.

    The policy scores chosen and rejected responses in one forward pass of the
    ``[2B, T]`` batch through :func:`~distillzoo.models.causal_lm.sequence_logps` (fused:
    no ``[2B, T, V]`` tensor). Reference log-probs come from ``reference`` (a frozen
    model, run without grad) or, when it is None, from the batch (a data column or a
    :class:`~distillzoo.teacher.reference_cache.ReferenceCache`). Metrics: the objective's
    (``rewards/*``, ``logps/*``, ...) plus ``loss``. ``distillzoo train`` runs the
    same loss through :func:`preference_loss` inside its training loop.
    """
    out = sequence_logps(policy, batch.input_ids, batch.attention_mask, batch.labels, fused=fused,
                         chunk_size=chunk_size)
    ref_out = None
    if objective.needs_reference and reference is not None:
        with torch.no_grad():
            ref_out = sequence_logps(reference, batch.input_ids, batch.attention_mask, batch.labels, fused=fused,
                                     chunk_size=chunk_size)
    loss = preference_loss(objective, batch, out, ref_out, policy, reference)
    return PreferenceStep(loss, {"loss": loss.detach(), **objective.metrics})


def preference_loss(objective: PreferenceObjective, batch, policy: SequenceLogps, reference: SequenceLogps | None,
                    policy_model=None, reference_model=None) -> Tensor:
    """The objective on one batch from the policy's (and the reference's) response log-probs ``[2B]``.

    ``reference`` is None when the reference log-probs come from the batch (a data
    column or a reference cache); ``objective.metrics`` holds the batch metrics after the call.
    """
    name = objective.name or type(objective).__name__
    n = batch.n_pairs
    ref_chosen = ref_rejected = None
    if objective.needs_reference:
        if reference is not None:
            ref_chosen, ref_rejected = reference.logps[:n], reference.logps[n:]
        elif batch.reference_chosen_logps is not None:
            ref_chosen, ref_rejected = batch.reference_chosen_logps, batch.reference_rejected_logps
        else:
            raise ParameterError(f"{name} needs reference log-probs: pass a reference model, or data whose records carry "
                                 "reference_chosen_logps/reference_rejected_logps (a column or a reference cache)")
    extra = objective.step_inputs(policy, reference, n, policy_model, reference_model)
    pol = objective.summed_logps(policy, n)
    if reference is not None:
        ref = objective.summed_logps(reference, n)
        ref_chosen, ref_rejected = ref[:n], ref[n:]
    elif objective.needs_reference and objective.reweights_tokens:
        raise ParameterError(f"{name} reweights each response's tokens, so it needs the reference's per-token "
                             "log-probs: a reference model, not log-probs from the data or a reference cache")
    return objective(pol[:n], pol[n:], ref_chosen, ref_rejected,
                     chosen_lengths=policy.lengths[:n], rejected_lengths=policy.lengths[n:], **extra)


def length_normalised(logps: Tensor, lengths: Tensor | None) -> Tensor:
    """Per-token average of summed log-probs (the input itself when lengths are None)."""
    return logps if lengths is None else logps / lengths


def _logps(name: str, what: str, x, like: Tensor | None) -> Tensor:
    if not isinstance(x, Tensor):
        raise ParameterError(f"{name}: {what} must be a tensor of per-response log-probs [B], got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise ParameterError(f"{name}: {what} must be a float tensor, got {x.dtype}")
    if x.dim() != 1:
        raise ParameterError(f"{name}: {what} has shape {tuple(x.shape)}; expected [B], one summed log-prob per response")
    if like is not None and x.shape != like.shape:
        raise ParameterError(f"{name}: {what} has shape {tuple(x.shape)} but policy_chosen_logps has shape "
                             f"{tuple(like.shape)}; every input holds one value per pair")
    if like is None and x.dtype not in (torch.float32, torch.float64):
        x = x.float()  # bf16 log-probs: the loss is taken in fp32
    return x


def _lengths(name: str, what: str, x, like: Tensor) -> Tensor | None:
    if x is None:
        return None
    x = torch.as_tensor(x, device=like.device)
    if x.shape != like.shape:
        raise ParameterError(f"{name}: {what} has shape {tuple(x.shape)} but the log-probs have shape {tuple(like.shape)}")
    if x.numel() and bool((x <= 0).any()):
        raise ParameterError(f"{name}: {what} must be positive token counts, got {x.tolist()[:8]}; "
                             "a response without tokens has no log-prob")
    return x.to(like.dtype)
