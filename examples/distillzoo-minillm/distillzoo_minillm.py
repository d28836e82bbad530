"""MiniLLM as a distillzoo training algorithm (a plugin package).

Gu, Dong, Wei, Huang. "MiniLLM: Knowledge Distillation of Large Language Models",
ICLR 2024, https://arxiv.org/abs/2306.08543.

MiniLLM minimises the *sequence-level* reverse KL, KL(q_theta || p) over whole
responses y sampled from the student q, by policy gradient. With per-token rewards
``r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x)`` its gradient splits into

* the **single-step** term, the exact reverse KL of every position's next-token
  distribution: ``sum_t w_t KL(q(.|y_<t) || p(.|y_<t))`` (differentiated through q);
* the **long-term** term, a policy gradient with the rewards to come:
  ``-sum_t w_t R_{t+1} grad log q(y_t)``, ``R_{t+1}`` the sum of ``r_t'`` for
  ``t' > t``, or with ``length_norm`` their mean (the paper's length normalisation,
  which keeps long samples from dominating).

Samples come from the teacher-mixed distribution ``(1 - a) q + a p`` (``teacher_mix``
= a, 0.2 in the paper), which keeps early samples from degenerating; the importance
weight of each token is ``w_t = q(y_t) / ((1 - a) q(y_t) + a p(y_t))``, per token as in
the paper. The surrogate below has exactly that gradient::

    loss = sum_t  w_t KL(q_t || p_t)  -  w_t sg(R_{t+1}) log q(y_t)

summed over the sampled tokens and divided by their number across the step (the
distillzoo loop does that), so ``loss`` is not the KL itself: the logged ``rkl`` is
the per-token reverse KL and ``reward`` the mean ``r_t``.

Left out, and why: PPO's ratio clipping (with one update per batch of samples, the
ratio is 1 at the update, so clipping is inactive) and the paper's language-modelling
loss on a pre-training corpus (add a ce run to the data mix instead).

Each step samples from the current student, seeded by the run's seed, the step and
each sample id (distillzoo's ``decode``), so a resumed run draws the same samples.
"""

from __future__ import annotations

import torch

import distillzoo as dz
from distillzoo.kernels import token_logprobs


def future_rewards(rewards: torch.Tensor, mask: torch.Tensor, length_norm: bool = True) -> torch.Tensor:
    """``R_{t+1}`` per position ``[B, T]``: the rewards after ``t`` in its row, summed (or averaged); 0 where masked.

    The last token of a response has nothing after it: 0.
    """
    r = torch.where(mask, rewards, 0.0)
    after = r.flip(-1).cumsum(-1).flip(-1) - r
    if length_norm:
        m = mask.to(r.dtype)
        count = m.flip(-1).cumsum(-1).flip(-1) - m
        after = torch.where(count > 0, after / count.clamp(min=1), 0.0)
    return torch.where(mask, after, 0.0)


def importance_weights(log_q: torch.Tensor, log_p: torch.Tensor, teacher_mix: float) -> torch.Tensor:
    """``q / ((1 - a) q + a p)`` per sampled token (1 when sampling from the student alone)."""
    if teacher_mix == 0:
        return torch.ones_like(log_q)
    return 1.0 / ((1 - teacher_mix) + teacher_mix * torch.exp(log_p - log_q))


class MiniLLM(dz.Algorithm):
    name = "minillm"
    summary = ("MiniLLM: sequence-level reverse KL by policy gradient on the student's own samples (single-step "
               "term + length-normalised long-term term, teacher-mixed sampling)")
    paper = {"title": "MiniLLM: Knowledge Distillation of Large Language Models",
             "authors": "Gu, Dong, Wei, Huang", "year": 2024, "url": "https://arxiv.org/abs/2306.08543"}
    objective_kinds = ("logit",)
    records = "instruction"  # prompts; the records' own replies are not trained on
    params = {
        "teacher_mix": {"type": "float", "default": 0.2, "range": "[0, 1]",
                        "doc": "a: samples come from (1 - a) q + a p, weighted back to q per token"},
        "max_new_tokens": {"type": "int", "default": 64, "range": "[1, inf)", "doc": "the longest sample"},
        "length_norm": {"type": "bool", "default": True,
                        "doc": "the long-term reward is the mean of the rewards to come, not their sum"},
    }
    progress_metrics = ("rkl", "reward")

    def roles(self, spec):
        return {"teacher": True}

    def check(self, spec, where):
        if self.objective.name != "rkl" or self.objective.temperature != 1.0:
            raise dz.ConfigError(f"{where}: objective: algorithm 'minillm' minimises the sequence-level reverse KL at "
                                 "temperature 1; set objective: {name: rkl}")
        dz.require_model(spec, "teacher", "algorithm 'minillm'", where)
        if spec.train.parallel == "fsdp":
            raise dz.ConfigError(f"{where}: train.parallel: minillm samples from the whole student; use ddp")
        self.per_token = dz.objective("rkl", reduction="none")

    def micro_batches(self, run, examples, step, size):
        sampling = dz.Sampling(self.max_new_tokens, temperature=1.0, seed=run.seed * 1_000_003 + step)
        mix = (run.teacher, self.teacher_mix) if self.teacher_mix else None
        samples = dz.student_samples(run.student, run.tokenizer, examples, sampling, mix=mix)
        return dz.instruction_batches(samples, size, run.tokenizer.pad_id, run.device)

    def loss(self, models, batch):
        x = batch.inputs
        targets = x["targets"]
        mask = targets != dz.IGNORE_INDEX
        hs, ws = models.hidden(models.student, x["input_ids"], x["attention_mask"]), models.head(models.student)
        with torch.no_grad():
            ht, wt = models.hidden(models.teacher, x["input_ids"], x["attention_mask"]), models.head(models.teacher)
        vocab = min(ws.shape[0], wt.shape[0])  # compared over the shared vocab, as the objectives are
        log_q = token_logprobs(hs, ws[:vocab], targets)
        with torch.no_grad():
            log_p = token_logprobs(ht, wt[:vocab], targets)
        single = self.per_token.from_hidden(hs, ws, ht, wt, targets)  # KL(q_t || p_t) per position, with grad
        reward = torch.where(mask, log_p - log_q.detach(), 0.0)
        future = future_rewards(reward, mask, self.length_norm)
        w = torch.where(mask, importance_weights(log_q.detach(), log_p, self.teacher_mix), 0.0)
        value = (w * single - w * future * log_q).sum()
        return dz.StepLoss(value, {"rkl": single.detach().sum(), "reward": reward.sum(), "weight": w.sum()})


@dz.hookimpl
def register_algorithms(register):
    register(MiniLLM)
