"""Naive references, written for clarity, that the objectives are checked against."""

import torch


def fkl_reference(student_logits, teacher_logits, labels=None):
    """KL(p || q) per row from its definition, with 0 log 0 = 0."""
    p = torch.softmax(teacher_logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    log_q = torch.log_softmax(student_logits, dim=-1)
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def rkl_reference(student_logits, teacher_logits, labels=None):
    """KL(q || p) per row from its definition."""
    return fkl_reference(teacher_logits, student_logits)


REFERENCES = {"fkl": fkl_reference, "rkl": rkl_reference}


def reference_loss(name, student_logits, teacher_logits, labels, *, tau=1.0, vocab=None, ignore_index=-100, reduction="mean"):
    """Whole-objective reference: truncate to the shared vocab, temperature, tau^2, mask, reduce."""
    vocab = vocab or min(student_logits.shape[-1], teacher_logits.shape[-1])
    valid = labels != ignore_index
    per_token = REFERENCES[name](student_logits[valid, :vocab] / tau, teacher_logits[valid, :vocab] / tau) * tau**2
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / valid.sum().clamp(min=1)
    out = torch.zeros(labels.shape, dtype=per_token.dtype)
    out[valid] = per_token
    return out
