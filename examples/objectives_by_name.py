"""Select objectives by name from a YAML config and compute a distillation loss at Qwen scale.

    python examples/objectives_by_name.py

A Qwen2.5-0.5B-sized student head (hidden 896, vocab 151,936) against a 1.5B-sized
teacher head (hidden 1536), on random hidden states: the fused from_hidden path
never builds the [tokens, vocab] logits, and gives the same loss and gradient as
the materialised-logits path.
"""

import tempfile
import time
from pathlib import Path

import torch

import distillzoo as dz

CONFIG = """\
objectives:
  - {name: ce, weight: 0.5}
  - {name: fkl, weight: 0.5, temperature: 2.0}
"""


def main():
    print("objectives in the zoo:", ", ".join(dz.list_objectives()))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "distill.yaml"
        path.write_text(CONFIG)
        loss_fn = dz.build_objective(dz.load_config(path))
    print("from config:", loss_fn)

    torch.manual_seed(0)
    tokens, vocab = 64, 151_936
    student_hidden = torch.randn(tokens, 896, requires_grad=True)
    student_weight = (torch.randn(vocab, 896) / 896**0.5).requires_grad_(True)
    teacher_hidden = torch.randn(tokens, 1536)
    teacher_weight = torch.randn(vocab, 1536) / 1536**0.5
    labels = torch.randint(0, vocab, (tokens,))
    labels[:16] = -100  # the prompt: no loss there

    start = time.perf_counter()
    fused = loss_fn.from_hidden(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, chunk_size=16)
    fused.backward()
    fused_grad = student_hidden.grad.clone()
    print(f"fused from_hidden: loss {fused.item():.6f}  ({time.perf_counter() - start:.2f} s)")
    print("  per term:", ", ".join(f"{name} {value.item():.6f}" for name, value in loss_fn.term_losses.items()))

    student_hidden.grad = None
    logits = loss_fn(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, labels)
    logits.backward()
    print(f"logit path:        loss {logits.item():.6f}")
    err = (fused_grad - student_hidden.grad).abs().max().item()
    print(f"max |d hidden| difference between the paths: {err:.2e}")
    assert abs(fused.item() - logits.item()) < 1e-4 and err < 1e-5


if __name__ == "__main__":
    main()
