"""Sequence log-probs of a tiny Qwen2 (vocab 151,936) and preference steps: fused path against the naive one."""

import pytest
import torch

import distillzoo as dz
from distillzoo.models.causal_lm import QWEN_VOCAB, tiny_qwen2
from distillzoo.data.records import IGNORE_INDEX
from distillzoo.data.pairs import PreferenceBatch

from helpers import rkl_reference

TEACHER_VOCAB = 152_064  # Qwen2.5-7B/14B/72B


def peaked(model, scale=30.0):
    """Sharpen the random lm_head so that log-probs are far from uniform."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    return model


@pytest.fixture(scope="module")
def policy():
    return peaked(tiny_qwen2(seed=0, dtype=torch.float64))


@pytest.fixture(scope="module")
def teacher():
    return peaked(tiny_qwen2(seed=1, hidden_size=48, vocab_size=TEACHER_VOCAB, dtype=torch.float64), 20.0)


def make_batch(prompt_lens=(5, 3), chosen_lens=(4, 7), rejected_lens=(6, 2), seed=0, vocab=QWEN_VOCAB):
    """A [2B, T] preference batch of random ids, chosen rows first, right-padded, prompts unlabelled."""
    g = torch.Generator().manual_seed(seed)
    rows = [(p, r) for p, r in zip(prompt_lens, chosen_lens)] + [(p, r) for p, r in zip(prompt_lens, rejected_lens)]
    width = max(p + r for p, r in rows)
    input_ids = torch.full((len(rows), width), 151643, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    mask = torch.zeros_like(input_ids)
    for i, (p, r) in enumerate(rows):
        input_ids[i, :p + r] = torch.randint(0, vocab, (p + r,), generator=g)
        labels[i, p:p + r] = input_ids[i, p:p + r]
        mask[i, :p + r] = 1
    return PreferenceBatch(input_ids, mask, labels, [f"pair{i}" for i in range(len(prompt_lens))])


def naive_sequence_logps(model, batch, logits=None):
    """Sum over labelled positions t of log_softmax(logits[t - 1])[token t], one position at a time."""
    if logits is None:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    sums = []
    for b in range(batch.input_ids.shape[0]):
        total = logits.new_zeros(())
        for t in range(1, batch.input_ids.shape[1]):
            if batch.labels[b, t] != IGNORE_INDEX:
                total = total + torch.log_softmax(logits[b, t - 1], dim=-1)[batch.labels[b, t]]
        sums.append(total)
    return torch.stack(sums)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fused_sequence_logps_equal_naive_gathers(policy, chunk_size):
    batch = make_batch()
    out = dz.sequence_logps(policy, batch.input_ids, batch.attention_mask, batch.labels, chunk_size=chunk_size)
    torch.testing.assert_close(out.logps, naive_sequence_logps(policy, batch), rtol=1e-10, atol=1e-10)
    assert out.lengths.tolist() == [4, 7, 6, 2]
    assert out.logps.dtype == torch.float64
    assert float(out.logps.detach().max()) < -10.0  # far from 0 and from uniform (4 tokens x log 151936 = 47.7)


def test_fp32_model_fused_matches_naive():
    model = peaked(tiny_qwen2(seed=3))
    batch = make_batch(seed=3)
    fused = dz.sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels).logps
    naive = dz.sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels, fused=False).logps
    torch.testing.assert_close(fused, naive, rtol=1e-5, atol=1e-3)


def test_tied_embeddings_get_gradients_from_both_uses():
    model = peaked(tiny_qwen2(seed=4, tie_word_embeddings=True, dtype=torch.float64), 1.0)
    batch = make_batch(seed=4)
    grads = []
    for fused in (True, False):
        model.zero_grad()
        dz.sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels, fused=fused).logps.sum().backward()
        grads.append(model.get_input_embeddings().weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)


def grads_of(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def step_grads(objective, policy, batch, reference, fused):
    policy.zero_grad()
    if reference is not None:
        reference.zero_grad()
    step = dz.preference_step(objective, policy, batch, reference, fused=fused)
    step.loss.backward()
    return step, grads_of(policy)


@pytest.mark.parametrize("name, params", [
    ("dpo", {"loss_type": "sigmoid"}), ("dpo", {"loss_type": "hinge", "beta": 0.01}), ("dpo", {"loss_type": "ipo"}),
    ("dpo", {"loss_type": "robust", "eps": 0.2, "rpo_alpha": 0.5}), ("simpo", {}), ("dpkd", {"ce_weight": 0.3}),
])
def test_preference_step_gradients_match_autograd_through_materialised_logits(policy, teacher, name, params):
    objective = dz.objective(name, **params)
    reference = teacher if objective.needs_reference else None
    batch = make_batch(seed=1)
    fused, fused_grads = step_grads(objective, policy, batch, reference, True)
    naive, naive_grads = step_grads(objective, policy, batch, reference, False)
    torch.testing.assert_close(fused.loss, naive.loss, rtol=1e-10, atol=1e-12)
    assert fused_grads.keys() == naive_grads.keys() and "lm_head.weight" in fused_grads
    assert "model.embed_tokens.weight" in fused_grads
    for key in naive_grads:
        torch.testing.assert_close(fused_grads[key], naive_grads[key], rtol=1e-8, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")
    assert any(float(g.abs().max()) > 0 for g in fused_grads.values())
    if reference is not None:
        assert all(p.grad is None for p in reference.parameters())  # the reference stays frozen


def test_dpkd_with_reverse_kl_matches_a_naive_computation(policy, teacher):
    """Teacher of another width and vocab (152,064): the rkl is over the shared 151,936 entries."""
    beta, ce_w, rkl_w = 0.2, 0.3, 0.7
    batch = make_batch(seed=2)
    n = batch.n_pairs
    policy.zero_grad()
    step = dz.preference_step(dz.objective("dpkd", beta=beta, ce_weight=ce_w, rkl_weight=rkl_w), policy, batch, teacher)
    step.loss.backward()
    fused_grads = grads_of(policy)

    # One student forward for both terms, as the fused step takes: Qwen2's RMSNorm computes in fp32 even
    # in a float64 model, so two forwards differ by fp32 rounding in the embedding gradients.
    policy.zero_grad()
    logits = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    q = naive_sequence_logps(policy, batch, logits)
    student_logits = logits[:n]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        p = naive_sequence_logps(teacher, batch, teacher_logits)
    lengths = (batch.labels[:, 1:] != IGNORE_INDEX).sum(-1)
    losses = []
    for b in range(n):
        scored = (batch.labels[b, 1:] != IGNORE_INDEX).nonzero().squeeze(1)
        rkl = rkl_reference(student_logits[b, scored, :QWEN_VOCAB], teacher_logits[b, scored, :QWEN_VOCAB]).mean()
        h = beta * (q[b] - p[b]) - beta * (q[n + b] - p[n + b])
        losses.append(-torch.nn.functional.logsigmoid(h) + ce_w * (-q[b] / lengths[b]) + rkl_w * rkl)
    expected = torch.stack(losses).mean()
    expected.backward()
    torch.testing.assert_close(step.loss, expected, rtol=1e-10, atol=1e-12)
    assert float(step.metrics["rkl"]) > 0.1
    for key, grad in grads_of(policy).items():
        torch.testing.assert_close(fused_grads[key], grad, rtol=1e-8, atol=1e-12, msg=lambda m, key=key: f"{key}: {m}")


def test_step_reads_reference_logps_from_the_batch(policy, teacher):
    batch = make_batch(seed=5)
    with torch.no_grad():
        ref = dz.sequence_logps(teacher, batch.input_ids, batch.attention_mask, batch.labels).logps
    n = batch.n_pairs
    batch.reference_chosen_logps, batch.reference_rejected_logps = ref[:n].float(), ref[n:].float()
    dpo = dz.objective("dpo", beta=0.3)
    from_batch = dz.preference_step(dpo, policy, batch).loss
    from_model = dz.preference_step(dpo, policy, batch, teacher).loss
    torch.testing.assert_close(from_batch, from_model, rtol=1e-6, atol=1e-7)  # the column is fp32


def test_step_metrics(policy, teacher):
    batch = make_batch(seed=6)
    step = dz.preference_step(dz.objective("dpo", beta=0.5), policy, batch, teacher)
    with torch.no_grad():
        q, p = naive_sequence_logps(policy, batch), naive_sequence_logps(teacher, batch)
    n = batch.n_pairs
    chosen, rejected = 0.5 * (q[:n] - p[:n]), 0.5 * (q[n:] - p[n:])
    assert float(step.metrics["rewards/margins"]) == pytest.approx(float((chosen - rejected).mean()), rel=1e-9)
    assert float(step.metrics["rewards/accuracies"]) == float((chosen > rejected).double().mean())
    assert float(step.metrics["logps/rejected"]) == pytest.approx(float(q[n:].mean()), rel=1e-9)
    assert float(step.metrics["loss"]) == pytest.approx(float(step.loss.detach()))


def test_step_without_any_reference_says_where_to_get_one(policy):
    with pytest.raises(dz.ParameterError, match=r"dpo needs reference log-probs: pass a reference model, or data"):
        dz.preference_step(dz.objective("dpo"), policy, make_batch())
    with pytest.raises(dz.ParameterError, match=r"dpkd: rkl_weight=1.0 needs the teacher model on the fused path"):
        dz.preference_step(dz.objective("dpkd", rkl_weight=1.0), policy, make_batch(), policy, fused=False)


def test_fused_path_saves_no_vocab_sized_activation(policy):
    """Autograd keeps nothing of [rows x vocab] on the fused path; the naive path keeps the logits."""
    batch = make_batch()
    scored_rows = int((batch.labels != IGNORE_INDEX).sum())
    for fused, expect_big in ((True, False), (False, True)):
        largest = []

        def pack(t):
            if all(t.data_ptr() != w.data_ptr() for w in policy.parameters()):  # weights are not activations
                largest.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            dz.sequence_logps(policy, batch.input_ids, batch.attention_mask, batch.labels, fused=fused)
        vocab_sized = [n for n in largest if n >= scored_rows * QWEN_VOCAB]
        assert bool(vocab_sized) == expect_big, (fused, max(largest))


def test_unsupported_heads_are_refused():
    model = tiny_qwen2(vocab_size=64, hidden_size=16)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(dz.ParameterError, match=r"caps its logits \(config.final_logit_softcapping=30.0\)"):
        dz.sequence_logps(model, torch.zeros(1, 4, dtype=torch.long), None, torch.zeros(1, 4, dtype=torch.long))
