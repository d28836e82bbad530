"""Built-in preference objectives: dpo (sigmoid, hinge, ipo, robust; RPO's NLL term), simpo, dpkd.

Each takes summed response log-probs ``[B]`` (see :mod:`distillzoo.objectives.preference`);
``distillzoo.sequence_logps`` computes them from a causal LM without a
``[batch, seq, vocab]`` tensor, and ``distillzoo.preference_step`` runs the
whole step (policy forward, reference model or cache, loss, metrics).

With Delta = [log pi(y_w) - log rho(y_w)] - [log pi(y_l) - log rho(y_l)]:

    sigmoid  -(1 - eps) log s(beta Delta) - eps log s(-beta Delta)      (Rafailov et al.; eps > 0: cDPO)
    hinge    max(0, 1 - beta Delta)                                     (SLiC)
    ipo      (Delta_avg - 1 / (2 beta))^2, per-token-averaged log-probs (Azar et al.)
    robust   [-(1 - eps) log s(beta Delta) + eps log s(-beta Delta)] / (1 - 2 eps)   (Chowdhury et al.)
    simpo    -log s(beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma)          (Meng et al.)
    dpkd     sigmoid dpo with the teacher as reference, y_w = the teacher's response,
             y_l = the student's own (Li, Gu, Dong et al.)
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from distillzoo.models.causal_lm import lm_head_weight
from distillzoo.errors import ParameterError
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.objectives.registry import objective
from distillzoo.objectives.preference import PairTerms, PreferenceObjective, length_normalised

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust")


def _noisy_sigmoid_loss(logits: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log s(x) - eps log s(-x): the Bradley-Terry loss with label noise eps (cDPO)."""
    loss = -F.logsigmoid(logits)
    return loss if eps == 0 else (1 - eps) * loss - eps * F.logsigmoid(-logits)


class DPO(PreferenceObjective):
    """Direct Preference Optimization and its loss-type relatives.

    ``rpo_alpha > 0`` adds RPO's NLL term (Pang et al. 2024), per pair
    ``rpo_alpha * -log pi(y_w) / |y_w|``; it needs ``chosen_lengths``. (TRL
    averages that NLL over all chosen tokens of the batch instead; the two agree
    when the chosen responses have one length.)
    """

    name = "dpo"

    def __init__(self, *, beta: float = 0.1, loss_type: str = "sigmoid", eps: float = 0.0, rpo_alpha: float = 0.0,
                 **common) -> None:
        super().__init__(**common)
        if loss_type not in DPO_LOSS_TYPES:
            raise ParameterError(f"{self.name}: loss_type {loss_type!r} is not one of {list(DPO_LOSS_TYPES)}")
        if eps and loss_type not in ("sigmoid", "robust"):
            raise ParameterError(f"{self.name}: eps={eps} applies to loss_type sigmoid or robust, not {loss_type!r}")
        if not 0 <= eps < 0.5:
            raise ParameterError(f"{self.name}: eps={eps} must be in [0, 0.5)")
        self.beta, self.loss_type, self.eps, self.rpo_alpha = float(beta), loss_type, float(eps), float(rpo_alpha)

    def log_ratios(self, pc, pr, rc, rr, cl, rl) -> tuple[Tensor, Tensor]:
        """log pi - log rho of chosen and rejected (per-token averages for ipo)."""
        if self.loss_type == "ipo":
            return (length_normalised(pc, cl) - length_normalised(rc, cl),
                    length_normalised(pr, rl) - length_normalised(rr, rl))
        return pc - rc, pr - rr

    def margin_losses(self, delta: Tensor) -> Tensor:
        beta, eps = self.beta, self.eps
        if self.loss_type == "hinge":
            return F.relu(1 - beta * delta)
        if self.loss_type == "ipo":
            return (delta - 1 / (2 * beta)) ** 2
        if self.loss_type == "robust":
            return (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        return _noisy_sigmoid_loss(beta * delta, eps)

    def pair_losses(self, pc, pr, rc, rr, cl, rl, **extra) -> PairTerms:
        chosen, rejected = self.log_ratios(pc, pr, rc, rr, cl, rl)
        losses = self.margin_losses(chosen - rejected)
        metrics = {}
        if self.rpo_alpha:
            nll = _chosen_nll(self.name, "rpo_alpha", pc, cl)
            losses = losses + self.rpo_alpha * nll
            metrics["nll_loss"] = nll.mean()
        return PairTerms(losses, self.beta * chosen.detach(), self.beta * rejected.detach(), metrics)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, loss_type={self.loss_type!r}, eps={self.eps}, rpo_alpha={self.rpo_alpha}, "
                + super().extra_repr())


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

    ``-(1 - eps) log s(x) - eps log s(-x)`` with
    ``x = beta/|y_w| log pi(y_w) - beta/|y_l| log pi(y_l) - gamma``; gamma is the
    target reward margin (TRL's ``simpo_gamma``; SimPO's own code takes gamma/beta).
    Rewards are ``beta * log pi / |y|``.
    """

    name = "simpo"
    needs_reference = False

    def __init__(self, *, beta: float = 2.0, gamma: float = 0.5, eps: float = 0.0, **common) -> None:
        super().__init__(**common)
        self.beta, self.gamma, self.eps = float(beta), float(gamma), float(eps)

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
