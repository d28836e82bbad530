"""Built-in token-level objectives that are not divergences: ce (hard labels) and dpkd_token.

Both implement ``loss_and_grad`` directly and pick the implementation per call
(``distillzoo.kernels.backend``): a Triton kernel on CUDA, the vocab-chunked torch
path on CPU, or the definition through ``token_loss`` (``DISTILLZOO_BACKEND=reference``).
ce needs one logsumexp and a gather, dpkd_token two argmaxes and four gathers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distillzoo.objectives.logit import LogitObjective

from distillzoo.objectives.sparse import SparseTeacher
from distillzoo.errors import ParameterError
from distillzoo.hooks.hookspecs import hookimpl
from distillzoo.kernels import vocab_chunked
from distillzoo.kernels.backend import backend_for, kernel_module


class CrossEntropy(LogitObjective):
    """Cross-entropy on hard labels, -log q(label), with optional label smoothing; no teacher.

    With smoothing eps: (1 - eps) * (-log q(label)) + eps * mean_v(-log q_v), the
    uniform part over the compared vocab (torch's convention). Used for SFT and
    for sequence-level KD on teacher-generated responses.
    """

    name = "ce"

    @classmethod
    def paths(cls) -> dict[str, str]:
        return {"cuda": "the Triton cross-entropy kernel",
                "cpu": "vocab-chunked torch; from_hidden: the column path, its own column form",
                "sparse teacher": "needs no teacher"}
    needs_teacher = False

    def __init__(self, *, label_smoothing: float = 0.0, **common) -> None:
        super().__init__(**common)
        self.label_smoothing = float(label_smoothing)

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor | None, labels: Tensor) -> Tensor:
        eps = self.label_smoothing
        picked = student_logprobs.gather(1, labels[:, None]).squeeze(1)
        return -(1 - eps) * picked - eps * student_logprobs.mean(-1)

    def grad_dtype(self, student_logits, teacher):
        if backend_for(student_logits) == "triton":
            return student_logits.dtype  # the kernel rounds once at the store
        return super().grad_dtype(student_logits, teacher)

    columns_buffers = 2  # the student's logits and a block's temporaries

    def columns_loss_and_grad(self, student, teacher, labels, want_grad):
        from distillzoo.kernels import columns

        _check_labels(self.name, labels, student.shape[0])
        loss, grad = columns.cross_entropy(student, labels.long(), self.temperature, self.label_smoothing, want_grad)
        scale = self.loss_scale
        if grad is not None and scale != 1.0:
            grad.mul_(scale)
        return loss * scale, grad

    def overwrites_grad(self, student_logits, teacher):
        # a subclass with its own loss_and_grad keeps the adding contract it was written for
        return type(self).loss_and_grad is CrossEntropy.loss_and_grad and backend_for(student_logits) == "triton"

    def loss_and_grad(self, student_logits, teacher, labels, grad=None, grad_scale=1.0, overwrite=False):
        _check_labels(self.name, labels, student_logits.shape[-1])
        scale = self.loss_scale
        backend = backend_for(student_logits)
        if overwrite and grad is not None and backend != "triton":
            grad.zero_()  # the other paths add
        if backend == "reference":
            return super().loss_and_grad(student_logits, None, labels, grad, grad_scale)
        if backend == "triton":
            loss = kernel_module("cross_entropy").loss_and_grad(
                student_logits, labels, self.temperature, self.label_smoothing, grad, grad_scale * scale,
                accumulate=not overwrite)
        else:
            loss = vocab_chunked.cross_entropy_loss_and_grad(
                student_logits, labels.long(), self.temperature, self.label_smoothing, grad, grad_scale * scale)
        return loss * scale


class TokenDPKD(LogitObjective):
    """Token-level DPKD (microsoft/LMOps): a DPO-style preference at every position.

    y+ = argmax p (the teacher's choice) and y- = argmax q (the student's);
    h = [log q(y+) - log q(y-)] - [log p(y+) - log p(y-)] (the normalisers cancel,
    so only four logits are read). sigmoid: -(1 - eps) log s(beta h) - eps log s(-beta h);
    ipo: (h - 1/(2 beta))^2. Where the argmaxes agree, h = 0 and there is no gradient;
    where the student's argmax is an entry the teacher masks (-inf), h = -inf and so is
    the sigmoid loss, as the formula says.
    """

    name = "dpkd_token"

    @classmethod
    def paths(cls) -> dict[str, str]:
        return {"cuda": "the Triton dpkd_token kernel",
                "cpu": "vocab-chunked torch (two argmax ids per row); from_hidden: the column path",
                "sparse teacher": "no"}

    def __init__(self, *, beta: float = 0.1, eps: float = 0.0, loss_type: str = "sigmoid", **common) -> None:
        super().__init__(**common)
        if loss_type not in ("sigmoid", "ipo"):
            raise ParameterError(f"dpkd_token: loss_type {loss_type!r} is not one of ['sigmoid', 'ipo']")
        self.beta, self.eps, self.loss_type = float(beta), float(eps), loss_type

    def margin_loss(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The loss of a margin h and its derivative."""
        beta, eps = self.beta, self.eps
        if self.loss_type == "ipo":
            gap = h - 1 / (2 * beta)
            return gap * gap, 2 * gap
        loss = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
        return loss, beta * (-(1 - eps) * torch.sigmoid(-beta * h) + eps * torch.sigmoid(beta * h))

    def token_loss(self, student_logprobs: Tensor, teacher_logprobs: Tensor, labels: Tensor) -> Tensor:
        chosen = teacher_logprobs.argmax(-1, keepdim=True)
        rejected = student_logprobs.detach().argmax(-1, keepdim=True)
        h = (student_logprobs.gather(1, chosen) - student_logprobs.gather(1, rejected)
             - teacher_logprobs.gather(1, chosen) + teacher_logprobs.gather(1, rejected)).squeeze(1)
        return self.margin_loss(h)[0]

    def grad_dtype(self, student_logits, teacher):
        if backend_for(student_logits) == "triton":
            return student_logits.dtype  # two entries per row are written
        return super().grad_dtype(student_logits, teacher)

    def loss_and_grad(self, student_logits, teacher, labels, grad=None, grad_scale=1.0):
        if isinstance(teacher, SparseTeacher):
            raise ParameterError("dpkd_token does not accept a sparse teacher")
        backend = backend_for(student_logits)
        if backend == "reference":
            return super().loss_and_grad(student_logits, teacher, labels, grad, grad_scale)
        tau, scale = self.temperature, self.loss_scale
        dtype = vocab_chunked.compute_dtype(student_logits.dtype)
        if backend == "triton":  # one read of both rows
            student_best, rejected, teacher_best, chosen = kernel_module("dpkd_token").argmax_pair(student_logits,
                                                                                                    teacher)
        else:
            teacher_best, chosen = vocab_chunked.argmax(teacher)
            student_best, rejected = vocab_chunked.argmax(student_logits)
        student_chosen = student_logits.gather(1, chosen[:, None]).squeeze(1).to(dtype)
        teacher_rejected = teacher.gather(1, rejected[:, None]).squeeze(1).to(dtype)
        h = ((student_chosen - student_best) - (teacher_best - teacher_rejected)) / tau
        loss, d_h = self.margin_loss(h)
        if grad is not None:
            d = (d_h * (grad_scale * scale / tau))[:, None].to(grad.dtype)
            grad.scatter_add_(1, chosen[:, None], d)
            grad.scatter_add_(1, rejected[:, None], -d)
        return loss * scale


def _check_labels(name: str, labels: Tensor, vocab: int) -> None:
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= vocab):
        bad = labels[(labels < 0) | (labels >= vocab)][0].item()
        raise ParameterError(f"{name}: label {bad} is outside the compared vocab [0, {vocab}); "
                             "positions without a target must hold ignore_index")


@hookimpl
def register_objectives(register):
    register(CrossEntropy)
    register(TokenDPKD)
