"""The DPO family against TRL 1.16's DPOTrainer loss on the same log-probs, and against hand formulas written
from each paper: every loss type, weighted combinations, the f-divergences, and the parameters refused by name."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import distillzoo as dz

NEW_TYPES = ["exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down",
             "discopop", "sigmoid_norm", "sft"]
ALL_TYPES = ["sigmoid", "hinge", "ipo", "robust", *NEW_TYPES]


def _batch(seed: int = 0, pairs: int = 6, width: int = 9):
    """Per-token log-probs of chosen and rejected responses of different lengths, for a policy and a reference,
    as [2B, T] rows (chosen first) with the completion mask TRL reads, and their sums."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, width, (2 * pairs,), generator=g)
    mask = torch.zeros(2 * pairs, width + 1, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, width + 1 - n:] = 1  # prompt first, then the completion
    shifted = mask[:, 1:].double()
    policy = -torch.rand(2 * pairs, width, generator=g, dtype=torch.float64) * 2 * shifted
    reference = -torch.rand(2 * pairs, width, generator=g, dtype=torch.float64) * 2 * shifted
    return SimpleNamespace(mask=mask, policy_tokens=policy, pc=policy.sum(1)[:pairs], pr=policy.sum(1)[pairs:],
                           rc=reference.sum(1)[:pairs], rr=reference.sum(1)[pairs:],
                           cl=lengths[:pairs].double(), rl=lengths[pairs:].double())


def _ours(b, **params):
    return dz.objective("dpo", **params)(b.pc, b.pr, b.rc, b.rr, chosen_lengths=b.cl, rejected_lengths=b.rl)


def _trl(b, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
         f_alpha_divergence_coef=0.5, discopop_tau=0.05, ld_alpha=None, log_sum_sq_probs=None):
    """TRL 1.16's DPOTrainer._compute_loss on these log-probs: its own code, with the policy's per-token log-probs
    as the model's output and the reference's sums as precomputed reference log-probs."""
    pytest.importorskip("trl", minversion="1.16")
    from trl.trainer.dpo_trainer import DPOTrainer

    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    b = SimpleNamespace(**{k: v.float() if v.is_floating_point() else v for k, v in vars(b).items()})  # TRL: fp32
    out = SimpleNamespace(log_probs=b.policy_tokens, entropy=torch.zeros_like(b.policy_tokens),
                          mean_logits=torch.zeros_like(b.policy_tokens),
                          is_top1=torch.zeros_like(b.policy_tokens, dtype=torch.bool),
                          log_sum_sq_probs=None if log_sum_sq_probs is None else log_sum_sq_probs.float())
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), aux_loss_enabled=False, precompute_ref_logps=True, ld_alpha=ld_alpha,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        beta=beta, loss_types=types, loss_weights=loss_weights or [1.0] * len(types),
        label_smoothing=label_smoothing, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, use_weighting=log_sum_sq_probs is not None,
        args=SimpleNamespace(discopop_tau=discopop_tau), _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros_like(b.mask), "attention_mask": torch.ones_like(b.mask),
              "completion_mask": b.mask, "ref_chosen_logps": b.rc, "ref_rejected_logps": b.rr}
    return DPOTrainer._compute_loss(trainer, lambda **kw: out, inputs, return_outputs=False)


@pytest.mark.parametrize("loss_type", ALL_TYPES)
def test_each_loss_type_equals_trl_on_the_same_log_probs(loss_type):
    b = _batch()
    smoothing = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)
    want = _trl(b, loss_type, label_smoothing=smoothing)
    got = _ours(b, loss_type=loss_type, label_smoothing=smoothing)
    assert float(got) == pytest.approx(float(want), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("f_divergence_type,coef", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                                    ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "exo_pair", "discopop", "sigmoid_norm"])
def test_the_f_divergences_equal_trl(loss_type, f_divergence_type, coef):
    b = _batch(1)
    smoothing = 1e-3 if loss_type == "exo_pair" else 0.0
    want = _trl(b, loss_type, label_smoothing=smoothing, f_divergence_type=f_divergence_type,
                f_alpha_divergence_coef=coef)
    got = _ours(b, loss_type=loss_type, label_smoothing=smoothing, f_divergence_type=f_divergence_type,
                f_alpha_divergence_coef=coef)
    assert float(got) == pytest.approx(float(want), rel=1e-6, abs=1e-9)


def test_weighted_combinations_equal_trl_and_the_weighted_sum_of_each_alone():
    b = _batch(2)
    types, weights = ["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]  # MPO's mixture
    want = _trl(b, types, weights)
    got = _ours(b, loss_type=types, loss_weights=weights)
    alone = sum(w * float(_ours(b, loss_type=t)) for t, w in zip(types, weights))
    assert float(got) == pytest.approx(float(want), rel=1e-6) and float(got) == pytest.approx(alone, rel=1e-12)


def _hand(name, c, r, cl, rl, pc, pr, rc, rr, beta, eps=0.0, tau=0.05):
    """Each loss per pair, from its paper (c, r: chosen and rejected log-ratios log pi - log rho)."""
    s, ls = torch.sigmoid, F.logsigmoid
    d = c - r
    if name == "exo_pair":  # EXO (Ji et al. 2024, Eq. 16, K = 2): KL(softmax(beta [c, r]) || [1 - eps, eps])
        p = torch.softmax(beta * torch.stack([c, r], -1), -1)
        target = torch.tensor([1 - eps, eps], dtype=c.dtype)
        return (p * (p.log() - target.log())).sum(-1)
    if name == "nca_pair":  # NCA (Chen et al. 2024), pairwise
        return -ls(beta * c) - 0.5 * ls(-beta * c) - 0.5 * ls(-beta * r)
    if name == "bco_pair":  # BCO (Jung et al. 2024) on pairs, no reward shift
        return -ls(beta * c) - ls(-beta * r)
    if name == "sppo_hard":  # SPPO (Wu et al. 2024) with P = 1 for the winner
        return (c - 1 / (2 * beta)) ** 2 + (r + 1 / (2 * beta)) ** 2
    if name in ("aot", "aot_unpaired"):  # AOT (Melnyk et al. 2024): the sorted margins, a quantile match
        delta = (torch.sort(pc - pr).values - torch.sort(rc - rr).values if name == "aot"
                 else torch.sort(c).values - torch.sort(r).values)
        return -(1 - eps) * ls(beta * delta) - eps * ls(-beta * delta)
    if name == "apo_zero":  # APO-zero (D'Oosterlinck et al. 2024, Eq. 7)
        return 1 - s(beta * c) + s(beta * r)
    if name == "apo_down":  # APO-down (Eq. 8)
        return s(beta * c) + 1 - s(beta * d)
    if name == "discopop":  # DiscoPOP (Lu et al. 2024): logistic and exponential losses mixed by s(x / tau)
        x = beta * d
        return (1 - s(x / tau)) * -ls(x) + s(x / tau) * torch.exp(-x)
    if name == "sigmoid_norm":  # DPO on per-token averaged log-ratios
        return -ls(beta * (c / cl - r / rl))
    if name == "sft":  # the chosen responses' NLL per token, over the batch
        return (-pc.sum() / cl.sum()).expand_as(c)
    raise AssertionError(name)


@pytest.mark.parametrize("loss_type", NEW_TYPES)
def test_each_new_loss_type_equals_a_hand_formula_from_its_paper_per_pair(loss_type):
    b = _batch(3)
    eps = {"exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}.get(loss_type, 0.0)
    got = dz.objective("dpo", beta=0.3, loss_type=loss_type, label_smoothing=eps, reduction="none")(
        b.pc, b.pr, b.rc, b.rr, chosen_lengths=b.cl, rejected_lengths=b.rl)
    want = _hand(loss_type, b.pc - b.rc, b.pr - b.rr, b.cl, b.rl, b.pc, b.pr, b.rc, b.rr, 0.3, eps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,f", [
    ("forward_kl", lambda u, a: 1 - 1 / u),                          # f-DPO (Wang et al. 2023), f'(u), u = pi/rho
    ("js_divergence", lambda u, a: torch.log(2 * u / (1 + u))),
    ("alpha_divergence", lambda u, a: (1 - u ** -a) / a),             # the paper's alpha = 1 - TRL's coefficient
])
def test_the_f_divergences_equal_the_f_dpo_papers_f_prime(name, f):
    b = _batch(4)
    coef = 0.3
    got = dz.objective("dpo", beta=0.2, f_divergence_type=name, f_alpha_divergence_coef=coef, reduction="none")(
        b.pc, b.pr, b.rc, b.rr)
    u_c, u_r = torch.exp(b.pc - b.rc), torch.exp(b.pr - b.rr)
    want = -F.logsigmoid(0.2 * (f(u_c, 1 - coef) - f(u_r, 1 - coef)))
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("params,message", [
    ({"loss_type": "sigmoidd"}, r"parameter 'loss_type' = 'sigmoidd' is not one of \['sigmoid', 'hinge', .*'sft'\]"
                                r".*Did you mean 'sigmoid'"),
    ({"loss_type": ["sigmoid", "nope"]}, r"parameter 'loss_type': 'nope' is not one of \['sigmoid'"),
    ({"loss_type": []}, r"parameter 'loss_type' must be a str or a non-empty list of str"),
    ({"loss_weights": ["a"]}, r"parameter 'loss_weights' must be a list of numbers or null"),
    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, r"loss_weights has 1 weight for 2 loss types"),
    ({"loss_type": "exo_pair"}, r"exo_pair needs eps \(TRL's label_smoothing\) in \(0, 1\)"),
    ({"loss_type": "hinge", "label_smoothing": 0.1}, r"eps=0.1 \(TRL's label_smoothing\) applies to loss_type "
                                                     r"sigmoid, robust, exo_pair, aot or aot_unpaired"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, r"eps=0.5 \(TRL's label_smoothing\) must be in \[0, 0.5\)"),
    ({"eps": 0.1, "label_smoothing": 0.2}, r"give eps or label_smoothing \(TRL's name for it\), not both"),
    ({"f_divergence_type": "kl"}, r"parameter 'f_divergence_type' = 'kl' is not one of \['reverse_kl', 'forward_kl', "
                                  r"'js_divergence', 'alpha_divergence'\]"),
    ({"loss_type": "nca_pair", "f_divergence_type": "forward_kl"}, r"f_divergence_type 'forward_kl' applies to "
                                                                    r"loss types .*; not to \['nca_pair'\]"),
    ({"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": float("nan")},
     r"f_alpha_divergence_coef"),
    ({"loss_type": "discopop", "discopop_tau": 0.0}, r"discopop_tau.*out of range \(0, inf\)"),
])
def test_bad_parameters_are_refused_by_name_with_the_valid_choices(params, message):
    with pytest.raises(dz.ParameterError, match=message):
        dz.objective("dpo", **params)


def _sequences(tokens, mask, **more):
    """A forward pass's SequenceLogps from per-token log-probs [2B, T] and the completion mask [2B, T + 1]."""
    from distillzoo.models.causal_lm import SequenceLogps

    shifted = mask[:, 1:].bool()
    targets = torch.where(shifted, more.pop("targets", torch.ones_like(mask[:, 1:])), -100)
    return SequenceLogps(tokens.sum(-1), shifted.sum(-1), targets=targets, tokens=tokens, **more)


def test_ld_dpo_weighs_the_tokens_past_the_shorter_response_as_trl_and_the_paper_do():
    from distillzoo.objectives.preference import preference_loss

    b, alpha = _batch(5), 0.4
    g = torch.Generator().manual_seed(6)
    reference_tokens = -torch.rand(b.policy_tokens.shape, generator=g, dtype=torch.float64) * 2 * b.mask[:, 1:]
    n = len(b.pc)

    def ld_sums(tokens):  # by hand: per pair, the first min(|y_w|, |y_l|) response tokens whole, the rest x alpha
        out = []
        for i in range(2 * n):
            values = tokens[i][b.mask[i, 1:].bool()].tolist()
            shared = int(min(b.cl[i % n], b.rl[i % n]))
            out.append(sum(values[:shared]) + alpha * sum(values[shared:]))
        return torch.tensor(out, dtype=torch.float64)

    pol, ref = ld_sums(b.policy_tokens), ld_sums(reference_tokens)
    hand = -F.logsigmoid(0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))).mean()
    want = _trl(SimpleNamespace(**{**vars(b), "rc": ref[:n], "rr": ref[n:]}), "sigmoid", ld_alpha=alpha)
    dpo = dz.objective("dpo", ld_alpha=alpha)
    batch = SimpleNamespace(n_pairs=n, reference_chosen_logps=None, reference_rejected_logps=None)
    got = preference_loss(dpo, batch, _sequences(b.policy_tokens, b.mask), _sequences(reference_tokens, b.mask))
    assert float(got) == pytest.approx(float(hand), rel=1e-12) and float(got) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(dz.ParameterError, match=r"dpo reweights each response's tokens, so it needs the reference's "
                                                r"per-token log-probs: a reference model"):
        preference_loss(dpo, SimpleNamespace(n_pairs=n, reference_chosen_logps=ref[:n],
                                             reference_rejected_logps=ref[n:]), _sequences(b.policy_tokens, b.mask),
                        None)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_wpo_weighting_equals_trl_with_the_policys_log_sum_of_squared_probs(loss_type):
    """The policy's hidden states and head at the real vocab; the weights come from the fused path's chunks, TRL's
    from log sum_v p_v^2 computed here by hand from the full logits."""
    from distillzoo.objectives.preference import preference_loss

    b = _batch(7, pairs=3, width=6)
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(*b.policy_tokens.shape, 16, generator=g)
    weight = torch.randn(151_936, 16, generator=g) * 0.3
    targets = torch.randint(0, 151_936, b.policy_tokens.shape, generator=g)
    logits = (hidden.double() @ weight.double().T)
    log_probs = torch.log_softmax(logits, -1)
    shifted = b.mask[:, 1:].bool()
    tokens = torch.where(shifted, log_probs.gather(-1, targets[..., None]).squeeze(-1), 0.0)
    squares = torch.logsumexp(2 * log_probs, -1)
    n = len(b.pc)
    b = SimpleNamespace(**{**vars(b), "policy_tokens": tokens, "pc": tokens.sum(1)[:n], "pr": tokens.sum(1)[n:]})
    want = _trl(b, loss_type, log_sum_sq_probs=squares)
    batch = SimpleNamespace(n_pairs=n, reference_chosen_logps=b.rc, reference_rejected_logps=b.rr)
    dpo = dz.objective("dpo", loss_type=loss_type, use_weighting=True)
    got = preference_loss(dpo, batch, _sequences(tokens, b.mask, targets=targets, hidden=hidden, weight=weight), None)
    assert float(got) == pytest.approx(float(want), rel=1e-5)
    w = torch.exp(torch.where(shifted, tokens - squares, 0.0).sum(-1) / shifted.sum(-1))
    plain = dz.objective("dpo", loss_type=loss_type, reduction="none")(
        b.pc, b.pr, b.rc, b.rr, chosen_lengths=b.cl, rejected_lengths=b.rl)
    assert float(got) == pytest.approx(float((plain * w[:n] * w[n:]).mean()), rel=1e-5)
    with pytest.raises(dz.ParameterError, match=r"use_weighting weighs each pair, and \['aot'\] sort"):
        dz.objective("dpo", loss_type="aot", use_weighting=True)
