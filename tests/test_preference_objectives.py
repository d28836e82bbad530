"""dpo (every loss_type), simpo and dpkd against float64 hand computations in plain Python."""

import math

import pytest
import torch

import distillzoo as dz

# Three pairs: summed log-probs of policy and reference, response token counts.
PC = [-5.0, -12.5, -3.25]
PR = [-7.5, -10.0, -9.0]
RC = [-6.0, -11.0, -4.0]
RR = [-7.0, -10.5, -8.0]
CL = [4, 10, 2]
RL = [6, 8, 5]


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def deltas(average=False):
    out = []
    for pc, pr, rc, rr, cl, rl in zip(PC, PR, RC, RR, CL, RL):
        if average:
            out.append((pc / cl - rc / cl) - (pr / rl - rr / rl))
        else:
            out.append((pc - rc) - (pr - rr))
    return out


def hand_dpo(loss_type, beta, eps=0.0, rpo_alpha=0.0):
    losses = []
    for i, d in enumerate(deltas(average=loss_type == "ipo")):
        if loss_type == "sigmoid":
            loss = -(1 - eps) * log_sigmoid(beta * d) - eps * log_sigmoid(-beta * d)
        elif loss_type == "hinge":
            loss = max(0.0, 1 - beta * d)
        elif loss_type == "ipo":
            loss = (d - 1 / (2 * beta)) ** 2
        else:
            loss = (-(1 - eps) * log_sigmoid(beta * d) + eps * log_sigmoid(-beta * d)) / (1 - 2 * eps)
        losses.append(loss + rpo_alpha * (-PC[i] / CL[i]))
    return losses


def call(objective, **extra):
    return objective(t(PC), t(PR), t(RC), t(RR), chosen_lengths=torch.tensor(CL), rejected_lengths=torch.tensor(RL),
                     **extra)


@pytest.mark.parametrize("loss_type, beta, eps", [
    ("sigmoid", 0.1, 0.0), ("sigmoid", 0.5, 0.2), ("hinge", 0.1, 0.0), ("hinge", 2.0, 0.0),
    ("ipo", 0.1, 0.0), ("ipo", 1.5, 0.0), ("robust", 0.1, 0.2), ("robust", 0.7, 0.05),
])
def test_dpo_loss_types_match_hand_computation(loss_type, beta, eps):
    expected = hand_dpo(loss_type, beta, eps)
    per_pair = call(dz.objective("dpo", beta=beta, loss_type=loss_type, eps=eps, reduction="none"))
    assert per_pair.dtype == torch.float64
    assert per_pair.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-12)
    mean = call(dz.objective("dpo", beta=beta, loss_type=loss_type, eps=eps))
    assert float(mean) == pytest.approx(sum(expected) / 3, rel=1e-12)
    total = call(dz.objective("dpo", beta=beta, loss_type=loss_type, eps=eps, reduction="sum"))
    assert float(total) == pytest.approx(sum(expected), rel=1e-12)


def test_hinge_is_zero_past_the_margin_and_robust_with_no_noise_is_sigmoid():
    # beta * Delta = 2 * [(-5+6) - (-7.5+7)] = 3 > 1 on the first pair
    assert call(dz.objective("dpo", beta=2.0, loss_type="hinge", reduction="none"))[0].item() == 0.0
    sigmoid = call(dz.objective("dpo", beta=0.3, reduction="none"))
    robust = call(dz.objective("dpo", beta=0.3, loss_type="robust", reduction="none"))
    torch.testing.assert_close(robust, sigmoid, rtol=1e-15, atol=0)


def test_ipo_without_lengths_takes_inputs_as_per_token_averages():
    dpo = dz.objective("dpo", beta=0.25, loss_type="ipo", reduction="none")
    averaged = dpo(t(PC) / t(CL), t(PR) / t(RL), t(RC) / t(CL), t(RR) / t(RL))
    assert averaged.tolist() == pytest.approx(hand_dpo("ipo", 0.25), rel=1e-12)


def test_rpo_adds_the_length_normalised_nll_of_the_chosen_response():
    dpo = dz.objective("dpo", beta=0.1, rpo_alpha=0.5, reduction="none")
    assert call(dpo).tolist() == pytest.approx(hand_dpo("sigmoid", 0.1, rpo_alpha=0.5), rel=1e-12)
    assert float(dpo.metrics["nll_loss"]) == pytest.approx(sum(-c / n for c, n in zip(PC, CL)) / 3, rel=1e-12)


@pytest.mark.parametrize("beta, gamma, eps", [(2.0, 0.5, 0.0), (2.5, 1.4, 0.0), (1.0, 0.0, 0.1)])
def test_simpo_matches_hand_computation(beta, gamma, eps):
    expected = []
    for pc, pr, cl, rl in zip(PC, PR, CL, RL):
        x = beta / cl * pc - beta / rl * pr - gamma
        expected.append(-(1 - eps) * log_sigmoid(x) - eps * log_sigmoid(-x))
    simpo = dz.objective("simpo", beta=beta, gamma=gamma, eps=eps, reduction="none")
    got = simpo(t(PC), t(PR), chosen_lengths=torch.tensor(CL), rejected_lengths=torch.tensor(RL))
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(simpo.metrics["rewards/chosen"]) == pytest.approx(sum(beta * c / n for c, n in zip(PC, CL)) / 3, rel=1e-12)


def test_dpkd_equals_dpo_with_the_teacher_as_reference():
    # Identity: y_w = the teacher's response, y_l = the student's, rho = the teacher.
    log_q_yt, log_q_ys, log_p_yt, log_p_ys = t(PC), t(PR), t(RC), t(RR)
    for beta in (0.1, 0.8):
        dpkd = dz.objective("dpkd", beta=beta, reduction="none")
        dpo = dz.objective("dpo", beta=beta, reduction="none")
        torch.testing.assert_close(dpkd(log_q_yt, log_q_ys, log_p_yt, log_p_ys), dpo(log_q_yt, log_q_ys, log_p_yt, log_p_ys),
                                   rtol=0, atol=0)
        assert dpkd.metrics.keys() == dpo.metrics.keys()
        for key in dpo.metrics:
            torch.testing.assert_close(dpkd.metrics[key], dpo.metrics[key], rtol=0, atol=0)
    # and to the SPEC's formula written out
    expected = [-log_sigmoid(0.1 * (q_t - p_t) - 0.1 * (q_s - p_s)) for q_t, q_s, p_t, p_s in zip(PC, PR, RC, RR)]
    assert dz.objective("dpkd", reduction="none")(log_q_yt, log_q_ys, log_p_yt, log_p_ys).tolist() == pytest.approx(expected, rel=1e-12)


def test_dpkd_first_stage_terms():
    rkl = t([0.3, 1.25, 0.0])
    dpkd = dz.objective("dpkd", beta=0.1, ce_weight=0.5, rkl_weight=2.0, reduction="none")
    got = call(dpkd, reverse_kl=rkl)
    expected = [h + 0.5 * (-pc / cl) + 2.0 * r for h, pc, cl, r in zip(hand_dpo("sigmoid", 0.1), PC, CL, rkl.tolist())]
    assert got.tolist() == pytest.approx(expected, rel=1e-12)
    assert float(dpkd.metrics["rkl"]) == pytest.approx(sum(rkl.tolist()) / 3)
    with pytest.raises(dz.ParameterError, match=r"dpkd: rkl_weight=2.0 needs reverse_kl= \[B\]"):
        call(dpkd)


def test_metrics_are_trl_style_batch_means():
    dpo = dz.objective("dpo", beta=0.5)
    call(dpo)
    chosen = [0.5 * (pc - rc) for pc, rc in zip(PC, RC)]
    rejected = [0.5 * (pr - rr) for pr, rr in zip(PR, RR)]
    expected = {
        "rewards/chosen": sum(chosen) / 3,
        "rewards/rejected": sum(rejected) / 3,
        "rewards/margins": sum(c - r for c, r in zip(chosen, rejected)) / 3,
        "rewards/accuracies": sum(c > r for c, r in zip(chosen, rejected)) / 3,
        "logps/chosen": sum(PC) / 3,
        "logps/rejected": sum(PR) / 3,
    }
    assert {k: float(v) for k, v in dpo.metrics.items()} == pytest.approx(expected, rel=1e-12)
    assert all(not v.requires_grad for v in dpo.metrics.values())


@pytest.mark.parametrize("name, params", [
    ("dpo", {"loss_type": "sigmoid", "eps": 0.1}), ("dpo", {"loss_type": "hinge"}), ("dpo", {"loss_type": "ipo"}),
    ("dpo", {"loss_type": "robust", "eps": 0.2}), ("dpo", {"rpo_alpha": 1.0}), ("simpo", {}),
    ("dpkd", {"ce_weight": 0.3}),
])
def test_gradients_pass_gradcheck(name, params):
    objective = dz.objective(name, beta=0.7, **params)
    lengths = dict(chosen_lengths=torch.tensor(CL), rejected_lengths=torch.tensor(RL))
    pc, pr = t(PC).requires_grad_(), t(PR).requires_grad_()
    if objective.needs_reference:
        fn = lambda a, b: objective(a, b, t(RC), t(RR), **lengths)  # noqa: E731
    else:
        fn = lambda a, b: objective(a, b, **lengths)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (pc, pr))


def test_sigmoid_gradient_is_the_dpo_weighting():
    # d/d log pi(y_w) of -log s(beta Delta) is -beta s(-beta Delta): the DPO paper's per-example weight.
    pc = t(PC).requires_grad_()
    dz.objective("dpo", beta=0.4, reduction="sum")(pc, t(PR), t(RC), t(RR)).backward()
    expected = [-0.4 / (1 + math.exp(0.4 * d)) for d in deltas()]
    assert pc.grad.tolist() == pytest.approx(expected, rel=1e-12)


def test_reference_is_treated_as_constant():
    rc = t(RC).requires_grad_()
    loss = dz.objective("dpo")(t(PC).requires_grad_(), t(PR), rc, t(RR))
    loss.backward()
    assert rc.grad is None


def test_bf16_inputs_give_an_fp32_loss():
    loss = dz.objective("dpo")(*(x.to(torch.bfloat16) for x in (t(PC), t(PR), t(RC), t(RR))))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize("build, args, kwargs, message", [
    (lambda: dz.objective("dpo"), (t(PC), t(PR)), {},
     r"dpo needs reference log-probs: reference_chosen_logps and reference_rejected_logps"),
    (lambda: dz.objective("simpo"), (t(PC), t(PR), t(RC), t(RR)), {}, r"simpo is reference-free: pass no reference log-probs"),
    (lambda: dz.objective("dpo"), (t(PC), t(PR)[:2], t(RC), t(RR)), {},
     r"dpo: policy_rejected_logps has shape \(2,\) but policy_chosen_logps has shape \(3,\)"),
    (lambda: dz.objective("dpo"), (t(PC)[None], t(PR), t(RC), t(RR)), {},
     r"dpo: policy_chosen_logps has shape \(1, 3\); expected \[B\]"),
    (lambda: dz.objective("dpo", rpo_alpha=1.0), (t(PC), t(PR), t(RC), t(RR)), {},
     r"dpo: rpo_alpha > 0 adds -log pi\(y_w\) / \|y_w\| and needs chosen_lengths"),
    (lambda: dz.objective("dpo"), (t(PC), t(PR), t(RC), t(RR)),
     {"chosen_lengths": torch.tensor([3, 0, 2]), "rejected_lengths": torch.tensor(RL)},
     r"dpo: chosen_lengths must be positive token counts, got \[3, 0, 2\]"),
    (lambda: dz.objective("dpo"), (t(PC), t(PR), t(RC), t(RR)), {"chosen_lengths": torch.tensor(CL)},
     r"give both chosen_lengths and rejected_lengths, or neither"),
    (lambda: dz.objective("dpo"), (t(PC), t(PR), t(RC), t(RR)), {"reverse_kl": t(PC)},
     r"dpo: unexpected input\(s\) \['reverse_kl'\]"),
])
def test_bad_inputs_say_what_is_wrong(build, args, kwargs, message):
    with pytest.raises(dz.ParameterError, match=message):
        build()(*args, **kwargs)


def test_eps_only_where_the_loss_type_takes_it():
    with pytest.raises(dz.ParameterError, match=r"dpo: eps=0.1 \(TRL's label_smoothing\) applies to loss_type sigmoid, "
                                             r"robust, exo_pair, aot or aot_unpaired, not \['hinge'\]"):
        dz.objective("dpo", loss_type="hinge", eps=0.1)
    with pytest.raises(dz.ParameterError, match=r"parameter 'loss_type' = 'sigmod' is not one of .* Did you mean 'sigmoid'"):
        dz.objective("dpo", loss_type="sigmod")


def test_preference_objectives_do_not_mix_with_logit_objectives():
    cfg = dz.load_config({"objectives": [{"name": "dpo", "weight": 1.0}, {"name": "ce", "weight": 0.5}]})
    with pytest.raises(dz.ConfigError, match=r"Mixture terms must be logit objectives; 'dpo' is 'preference'"):
        dz.build_objective(cfg)
