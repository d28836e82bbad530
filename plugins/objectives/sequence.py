"""Built-in preference objectives: dpo (every loss type of TRL's DPOTrainer, alone or weighted, f-DPO's
divergences, RPO's NLL term), simpo, dpkd.

Each takes summed response log-probs ``[B]`` (see :mod:`distillzoo.objectives.preference`);
``distillzoo.sequence_logps`` computes them from a causal LM without a
``[batch, seq, vocab]`` tensor, and ``distillzoo.preference_step`` runs the
whole step (policy forward, reference model or cache, loss, metrics).

With c = log pi(y_w) - log rho(y_w), r = log pi(y_l) - log rho(y_l), Delta = c - r, eps (TRL: label_smoothing):

    sigmoid    -(1 - eps) log s(beta Delta) - eps log s(-beta Delta)    (Rafailov et al.; eps > 0: cDPO)
    hinge      max(0, 1 - beta Delta)                                   (SLiC)
    ipo        (c/|y_w| - r/|y_l| - 1 / (2 beta))^2                     (Azar et al.)
    robust     [-(1 - eps) log s(beta Delta) + eps log s(-beta Delta)] / (1 - 2 eps)   (Chowdhury et al.)
    exo_pair   KL(softmax(beta [c, r]) || [1 - eps, eps])               (Ji et al.)
    nca_pair   -log s(beta c) - log s(-beta c)/2 - log s(-beta r)/2     (Chen et al.)
    bco_pair   -log s(beta c) - log s(-beta r)                          (Jung et al.)
    sppo_hard  (c - 1/(2 beta))^2 + (r + 1/(2 beta))^2                  (Wu et al.)
    aot        the sigmoid loss on the sorted policy margins minus the sorted reference margins; aot_unpaired
               on sort(c) - sort(r)                                     (Melnyk et al.)
    apo_zero   1 - s(beta c) + s(beta r); apo_down: s(beta c) + 1 - s(beta Delta)   (D'Oosterlinck et al.)
    discopop   logistic and exponential losses of beta Delta mixed by s(beta Delta / tau)   (Lu et al.)
    sigmoid_norm  -log s(beta (c/|y_w| - r/|y_l|))
    sft        the chosen tokens' NLL, averaged over the batch
    simpo      -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)          (Meng et al.)
    dpkd       sigmoid dpo with the teacher as reference, y_w = the teacher's response,
               y_l = the student's own (Li, Gu, Dong et al.)

With ``f_divergence_type`` (f-DPO, Wang et al.), c and r become f'(u) of the divergence at u = pi / rho where
the loss type is built on the reward difference.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from distillzoo.models.causal_lm import lm_head_weight
from distillzoo.errors import ParameterError, did_you_mean
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.objectives.registry import objective
from distillzoo.data.records import IGNORE_INDEX
from distillzoo.objectives.preference import PairTerms, PreferenceObjective, length_normalised

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
#: the loss types built on the chosen-rejected reward difference, where f-DPO's log Z(x) cancels
F_DIVERGENCE_LOSS_TYPES = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft")
#: the loss types that read label_smoothing (sigmoid: cDPO's label noise)
SMOOTHED = ("sigmoid", "robust", "exo_pair", "aot", "aot_unpaired")
#: the loss types that read per-token averaged log-ratios (the inputs as given when lengths are None)
BY_LENGTH = ("ipo", "sigmoid_norm")


def _smoothing(name: str, eps: float, label_smoothing: float | None) -> float:
    """The label-noise rate, given as ``eps`` or as TRL's ``label_smoothing`` (not both)."""
    if label_smoothing is None:
        return float(eps)
    if eps and float(eps) != float(label_smoothing):
        raise ParameterError(f"{name}: give eps or label_smoothing (TRL's name for it), not both; got eps={eps} and "
                             f"label_smoothing={label_smoothing}")
    return float(label_smoothing)


def _noisy_sigmoid_loss(logits: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log s(x) - eps log s(-x): the Bradley-Terry loss with label noise eps (cDPO)."""
    loss = -F.logsigmoid(logits)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-logits)


class DPO(PreferenceObjective):
    """Direct Preference Optimization and its loss-type relatives, with TRL's parameter names.

    ``loss_type`` names one loss or a list, summed with ``loss_weights`` (default 1 each: MPO's mixture is
    ``[sigmoid, bco_pair, sft]`` with ``[0.8, 0.2, 1.0]``). ``f_divergence_type`` replaces the log-ratio
    ``log u`` (u = pi / rho) by f'(u) of another f-divergence (f-DPO) for the loss types built on the reward
    difference. ``rpo_alpha > 0`` adds RPO's NLL term (Pang et al. 2024), per pair
    ``rpo_alpha * -log pi(y_w) / |y_w|``; it needs ``chosen_lengths``. (TRL averages that NLL over all chosen
    tokens of the batch instead, which is ``loss_type: [sigmoid, sft]``.)
    """

    name = "dpo"

    def __init__(self, *, beta: float = 0.1, loss_type="sigmoid", loss_weights=None, eps: float = 0.0,
                 label_smoothing: float | None = None, f_divergence_type: str = "reverse_kl",
                 f_alpha_divergence_coef: float = 0.5, discopop_tau: float = 0.05, rpo_alpha: float = 0.0,
                 ld_alpha: float | None = None, use_weighting: bool = False, **common) -> None:
        super().__init__(**common)
        types = [loss_type] if isinstance(loss_type, str) else list(loss_type or [])
        if not types:
            raise ParameterError(f"{self.name}: loss_type: give a loss type or a list of them, from "
                                 f"{list(DPO_LOSS_TYPES)}")
        for t in types:
            if t not in DPO_LOSS_TYPES:
                raise ParameterError(f"{self.name}: loss_type {t!r} is not one of {list(DPO_LOSS_TYPES)}"
                                     + did_you_mean(str(t), DPO_LOSS_TYPES))
        weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
        if len(weights) != len(types):
            raise ParameterError(f"{self.name}: loss_weights has {len(weights)} weight{'s' * (len(weights) != 1)} "
                                 f"for {len(types)} loss types {types}; give one per loss type")
        if not all(math.isfinite(w) for w in weights):
            raise ParameterError(f"{self.name}: loss_weights must be finite, got {weights}")
        eps = _smoothing(self.name, eps, label_smoothing)
        if eps and not set(types) & set(SMOOTHED):
            raise ParameterError(f"{self.name}: eps={eps} (TRL's label_smoothing) applies to loss_type "
                                 f"{', '.join(SMOOTHED[:-1])} or {SMOOTHED[-1]}, not {types}")
        if "exo_pair" in types and not 0 < eps < 1:
            raise ParameterError(f"{self.name}: exo_pair needs eps (TRL's label_smoothing) in (0, 1): EXO's epsilon; "
                                 f"the paper uses 1e-3; got {eps}")
        if set(types) & {"sigmoid", "robust", "aot", "aot_unpaired"} and not 0 <= eps < 0.5:
            raise ParameterError(f"{self.name}: eps={eps} (TRL's label_smoothing) must be in [0, 0.5) for {types}")
        if f_divergence_type not in F_DIVERGENCES:
            raise ParameterError(f"{self.name}: f_divergence_type {f_divergence_type!r} is not one of "
                                 f"{list(F_DIVERGENCES)}" + did_you_mean(str(f_divergence_type), F_DIVERGENCES))
        outside = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if f_divergence_type != "reverse_kl" and outside:
            raise ParameterError(f"{self.name}: f_divergence_type {f_divergence_type!r} applies to loss types "
                                 f"{list(F_DIVERGENCE_LOSS_TYPES)}; not to {outside}")
        if not math.isfinite(float(f_alpha_divergence_coef)):
            raise ParameterError(f"{self.name}: f_alpha_divergence_coef must be finite, got {f_alpha_divergence_coef}")
        self.beta, self.eps, self.rpo_alpha = float(beta), eps, float(rpo_alpha)
        self.loss_types, self.weights = types, weights
        self.loss_weights, self.label_smoothing = loss_weights, label_smoothing  # as given
        self.loss_type = types[0] if len(types) == 1 else types
        self.f_divergence_type, self.f_alpha_divergence_coef = f_divergence_type, float(f_alpha_divergence_coef)
        self.discopop_tau = float(discopop_tau)
        if ld_alpha is not None and not 0 <= float(ld_alpha) <= 1:
            raise ParameterError(f"{self.name}: ld_alpha={ld_alpha} must be in [0, 1] (1: no down-weighting)")
        sorted_types = [t for t in types if t in ("aot", "aot_unpaired")]
        if use_weighting and sorted_types:
            raise ParameterError(f"{self.name}: use_weighting weighs each pair, and {sorted_types} sort the batch's "
                                 "margins, which would misalign the weights; use another loss type")
        self.ld_alpha = None if ld_alpha is None else float(ld_alpha)
        self.reweights_tokens = self.ld_alpha is not None
        self.use_weighting = bool(use_weighting)

    extra_inputs = ("wpo_weights",)

    def summed_logps(self, seq, n_pairs: int) -> Tensor:
        """The response log-probs: plain sums, or with ``ld_alpha`` (LD-DPO, Liu et al. 2024) each pair's tokens past
        the shorter response's length weighted by alpha: ``sum_{t <= min(|y_w|, |y_l|)} + alpha sum_{t > ...}``."""
        if self.ld_alpha is None:
            return seq.logps
        if seq.tokens is None or seq.targets is None:
            raise ParameterError(f"{self.name}: ld_alpha needs each response's per-token log-probs")
        mask = seq.targets != IGNORE_INDEX
        lengths = mask.sum(-1)
        shared = torch.minimum(lengths[:n_pairs], lengths[n_pairs:]).repeat(2)
        tail = torch.full_like(seq.tokens, self.ld_alpha)
        weights = torch.where(mask.cumsum(-1) <= shared[:, None], torch.ones_like(tail), tail) * mask
        return (seq.tokens * weights).sum(-1)

    def step_inputs(self, policy, reference, n_pairs, policy_model, reference_model):
        """With ``use_weighting`` (WPO, Zhou et al. 2024): each pair's weight ``w(y_w) w(y_l)``, where ``w(y)`` is
        the exponential of the mean over y's tokens of ``log pi(y_t) - log sum_v pi_v^2`` (the policy's, without
        grad), from the fused path's hidden states in chunks of rows, never a ``[2B, T, V]`` tensor."""
        if not self.use_weighting:
            return {}
        if policy.hidden is None or policy.tokens is None:
            raise ParameterError(f"{self.name}: use_weighting needs the fused path (the policy's hidden states), "
                                 "not the naive one")
        weight = policy.weight if policy.weight is not None else lm_head_weight(policy_model)
        with torch.no_grad():
            mask = policy.targets != IGNORE_INDEX
            rows = policy.hidden[mask]
            squares = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
            step = max(1, (1 << 24) // weight.shape[0])
            for start in range(0, rows.shape[0], step):
                z = (rows[start:start + step] @ weight.T).float()
                squares[start:start + step] = torch.logsumexp(2 * z, -1) - 2 * torch.logsumexp(z, -1)
            aligned = torch.zeros(mask.shape, dtype=torch.float32, device=rows.device)
            aligned[mask] = policy.tokens.detach()[mask].float() - squares
            w = torch.exp(aligned.sum(-1) / mask.sum(-1).clamp(min=1))
        return {"wpo_weights": w[:n_pairs] * w[n_pairs:]}

    def scores(self, logratio: Tensor) -> Tensor:
        """f'(u) at u = pi / rho, from log u: log u (reverse KL, DPO), 1 - 1/u (forward KL), log(2u / (1 + u))
        (Jensen-Shannon), (u^(a - 1) - 1) / (a - 1) (alpha, ``a = f_alpha_divergence_coef``; log u at a = 1)."""
        kind = self.f_divergence_type
        if kind == "forward_kl":
            return 1 - torch.exp(-logratio)
        if kind == "js_divergence":
            return math.log(2) + F.logsigmoid(logratio)
        a = self.f_alpha_divergence_coef
        if kind == "alpha_divergence" and abs(a - 1) >= 1e-6:
            t = ((a - 1) * logratio).clamp(max=80.0)  # exp stays finite in fp32, as TRL clamps
            return torch.expm1(t) / (a - 1)
        return logratio

    def loss(self, loss_type: str, c: Tensor, r: Tensor, cs: Tensor, rs: Tensor, pc, pr, rc, rr, cl, rl) -> Tensor:
        """One loss type's per-pair losses from the log-ratios ``c``, ``r`` (chosen, rejected) and their f-scores."""
        beta, eps, d = self.beta, self.eps, cs - rs
        ls, s = F.logsigmoid, torch.sigmoid
        if loss_type == "sft" and cl is None:
            raise ParameterError(f"{self.name}: loss_type 'sft' needs chosen_lengths (the number of tokens of each "
                                 "chosen response)")
        if loss_type == "sigmoid":
            return _noisy_sigmoid_loss(beta * d, eps)
        if loss_type == "hinge":
            return F.relu(1 - beta * d)
        if loss_type == "ipo":
            return (length_normalised(cs, cl) - length_normalised(rs, rl) - 1 / (2 * beta)) ** 2
        if loss_type == "robust":
            return (-(1 - eps) * ls(beta * d) + eps * ls(-beta * d)) / (1 - 2 * eps)
        if loss_type == "exo_pair":
            x = beta * d
            return s(x) * (ls(x) - math.log1p(-eps)) + s(-x) * (ls(-x) - math.log(eps))
        if loss_type == "nca_pair":
            return -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
        if loss_type == "bco_pair":
            return -ls(beta * c) - ls(-beta * r)
        if loss_type == "sppo_hard":
            return (c - 0.5 / beta) ** 2 + (r + 0.5 / beta) ** 2
        if loss_type in ("aot", "aot_unpaired"):
            delta = (torch.sort(pc - pr).values - torch.sort(rc - rr).values if loss_type == "aot"
                     else torch.sort(c).values - torch.sort(r).values)
            return -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
        if loss_type == "apo_zero":
            return 1 - s(beta * c) + s(beta * r)
        if loss_type == "apo_down":
            return s(beta * c) + 1 - s(beta * (c - r))
        if loss_type == "discopop":
            x = beta * d
            mix = s(x / self.discopop_tau)
            return -ls(x) * (1 - mix) + torch.exp(-x) * mix
        if loss_type == "sigmoid_norm":
            return -ls(beta * (length_normalised(cs, cl) - length_normalised(rs, rl)))
        # sft: the chosen responses' NLL per token over the whole batch, the same for every pair
        return (-pc.sum() / cl.sum()).expand_as(pc)

    def pair_losses(self, pc, pr, rc, rr, cl, rl, wpo_weights: Tensor | None = None, **extra) -> PairTerms:
        c, r = pc - rc, pr - rr
        cs, rs = self.scores(c), self.scores(r)
        losses, metrics = 0, {}
        if self.use_weighting and wpo_weights is None:
            raise ParameterError(f"{self.name}: use_weighting needs wpo_weights= [B], each pair's WPO weight "
                                 "(preference_step computes it from the policy's hidden states)")
        for loss_type, weight in zip(self.loss_types, self.weights):
            part = self.loss(loss_type, c, r, cs, rs, pc, pr, rc, rr, cl, rl)
            if wpo_weights is not None:
                part = part * wpo_weights.to(part.dtype)
            losses = losses + weight * part
            if len(self.loss_types) > 1:
                metrics[f"loss/{loss_type}"] = part.detach().mean()
        if self.rpo_alpha:
            nll = _chosen_nll(self.name, "rpo_alpha", pc, cl)
            losses = losses + self.rpo_alpha * nll
            metrics["nll_loss"] = nll.detach().mean()
        if len(self.loss_types) == 1 and self.loss_types[0] in BY_LENGTH:  # the rewards of the ratios they read
            c, r = length_normalised(c, cl), length_normalised(r, rl)
        return PairTerms(losses, self.beta * c.detach(), self.beta * r.detach(), metrics)

    def extra_repr(self) -> str:
        weights = "" if len(self.loss_types) == 1 else f", loss_weights={self.weights}"
        fdiv = "" if self.f_divergence_type == "reverse_kl" else f", f_divergence_type={self.f_divergence_type!r}"
        return (f"beta={self.beta}, loss_type={self.loss_type!r}{weights}{fdiv}, eps={self.eps}, "
                f"rpo_alpha={self.rpo_alpha}, " + super().extra_repr())


class DPKD(DPO):
    """Sequence-level Direct Preference Knowledge Distillation (Li, Gu, Dong et al. 2024).

    DPO's sigmoid loss where the reference is the teacher ``p``, the chosen
    response is the teacher's ``y_t`` and the rejected one the student's own
    ``y_s``: ``-log s(beta [log q(y_t) - log p(y_t)] - beta [log q(y_s) - log p(y_s)])``.
    Pass ``policy_chosen_logps = log q(y_t)``, ``policy_rejected_logps = log q(y_s)``,
    ``reference_chosen_logps = log p(y_t)``, ``reference_rejected_logps = log p(y_s)``.

    The paper's first stage adds a divergence term; here two optional ones, per pair:
    ``ce_weight * -log q(y_t) / |y_t|`` (needs ``chosen_lengths``) and
    ``rkl_weight * reverse_kl``, the per-token reverse KL(q || p) averaged over
    ``y_t``'s tokens, which the caller computes (``preference_step`` does, from
    the teacher model) and passes as ``reverse_kl=`` ``[B]``.
    """

    name = "dpkd"
    default_algorithm = "dpkd"
    extra_inputs = ("reverse_kl",)

    def __init__(self, *, beta: float = 0.1, ce_weight: float = 0.0, rkl_weight: float = 0.0, **common) -> None:
        super().__init__(beta=beta, loss_type="sigmoid", **common)
        self.ce_weight, self.rkl_weight = float(ce_weight), float(rkl_weight)

    def step_inputs(self, policy, reference, n_pairs, policy_model, reference_model):
        if not self.rkl_weight:
            return {}
        if reference is None or reference.hidden is None or policy.hidden is None:
            raise ParameterError(f"{self.name}: rkl_weight={self.rkl_weight} needs the teacher model on the fused path "
                                 "(its logits along the teacher's response); a reference cache holds only sequence "
                                 "log-probs")
        rkl = objective("rkl", reduction="none")
        ws = policy.weight if policy.weight is not None else lm_head_weight(policy_model)
        wt = reference.weight if reference.weight is not None else lm_head_weight(reference_model)
        per_token = rkl.from_hidden(policy.hidden[:n_pairs], ws, reference.hidden[:n_pairs], wt,
                                    policy.targets[:n_pairs])
        return {"reverse_kl": per_token.sum(-1) / policy.lengths[:n_pairs]}

    def pair_losses(self, pc, pr, rc, rr, cl, rl, reverse_kl: Tensor | None = None, **extra) -> PairTerms:
        terms = super().pair_losses(pc, pr, rc, rr, cl, rl)
        if self.ce_weight:
            ce = _chosen_nll(self.name, "ce_weight", pc, cl)
            terms.losses = terms.losses + self.ce_weight * ce
            terms.metrics["ce"] = ce.mean()
        if self.rkl_weight:
            if reverse_kl is None:
                raise ParameterError(f"{self.name}: rkl_weight={self.rkl_weight} needs reverse_kl= [B], the per-token "
                                     "reverse KL(q || p) averaged over each teacher response (needs the teacher's "
                                     "logits; a reference cache of sequence log-probs cannot give it)")
            terms.losses = terms.losses + self.rkl_weight * reverse_kl
            terms.metrics["rkl"] = reverse_kl.detach().mean()
        return terms

    def extra_repr(self) -> str:
        return f"beta={self.beta}, ce_weight={self.ce_weight}, rkl_weight={self.rkl_weight}, reduction={self.reduction!r}"


class SimPO(PreferenceObjective):
    """Simple Preference Optimization (Meng, Xia, Chen 2024): reference-free, length-normalised.

    ``-(1 - eps) log s(x) - eps log s(-x)`` (``eps``, or TRL's name ``label_smoothing``) with
    ``x = beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma``; gamma is the
    target reward margin (TRL's ``simpo_gamma``; SimPO's own code takes gamma/beta).
    Rewards are ``beta * log pi / |y|``.
    """

    name = "simpo"
    needs_reference = False

    def __init__(self, *, beta: float = 2.0, gamma: float = 0.5, eps: float = 0.0,
                 label_smoothing: float | None = None, **common) -> None:
        super().__init__(**common)
        self.beta, self.gamma, self.eps = float(beta), float(gamma), _smoothing(self.name, eps, label_smoothing)
        self.label_smoothing = label_smoothing

    def pair_losses(self, pc, pr, rc, rr, cl, rl, **extra) -> PairTerms:
        chosen = self.beta * length_normalised(pc, cl)
        rejected = self.beta * length_normalised(pr, rl)
        losses = _noisy_sigmoid_loss(chosen - rejected - self.gamma, self.eps)
        return PairTerms(losses, chosen.detach(), rejected.detach())

    def extra_repr(self) -> str:
        return f"beta={self.beta}, gamma={self.gamma}, eps={self.eps}, reduction={self.reduction!r}"


def _chosen_nll(name: str, param: str, policy_chosen: Tensor, chosen_lengths: Tensor | None) -> Tensor:
    if chosen_lengths is None:
        raise ParameterError(f"{name}: {param} > 0 adds -log pi(y_w) / |y_w| and needs chosen_lengths "
                             "(the number of tokens of each chosen response)")
    return -policy_chosen / chosen_lengths


@hookimpl
def register_objectives(register):
    register(DPO)
    register(SimPO)
    register(DPKD)
