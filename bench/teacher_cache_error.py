"""Bytes per token and KL error of a top-k teacher cache against the dense teacher.

    python examples/quickstart.py            # trains the models this reads
    python bench/teacher_cache_error.py [--k 8 32 128] [--dtype bfloat16]

For each k, the quickstart teacher's top-k log-probs and tail over the held-out
response tokens are stored as a cache would store them (ids int32, log-probs in
--dtype, tail fp32), and KL(teacher || student) per token is computed from them
(the (k+1)-bucket KL that training from the cache minimises) and from the dense
teacher, for the distilled and the ce-only student. Prints a markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import distillzoo as dz
from distillzoo.objectives.sparse import SparseTeacher
from distillzoo.models.causal_lm import final_hidden, lm_head_weight, load_causal_lm
from distillzoo.data.shards import ConversationDataset, collate_sft
from distillzoo.teacher.cache import DTYPES, teacher_topk
from distillzoo.data.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "quickstart"))
    parser.add_argument("--data", default=str(ROOT / "data" / "quickstart" / "eval.jsonl"))
    parser.add_argument("--k", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    args = parser.parse_args()
    runs = Path(args.runs)
    tok = load_tokenizer()
    data = ConversationDataset(args.data, "chat", tok, system=None)
    batch = collate_sft([data[i] for i in range(len(data))], tok.pad_id)
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    teacher = load_causal_lm(str(runs / "teacher" / "final"))
    ht = final_hidden(teacher, batch["input_ids"], batch["attention_mask"])[:, :-1][valid]
    wt = lm_head_weight(teacher)
    fkl = dz.objective("fkl", reduction="mean")
    n = int(valid.sum())
    print(f"held-out response tokens: {n}; teacher {runs / 'teacher' / 'final'}; log-probs stored as {args.dtype}\n")
    print("| student | k | bytes/token | teacher mass in top-k | KL dense | KL from cache | abs error | rel error |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("student-fkl", "student-ce"):
        student = load_causal_lm(str(runs / name / "final"))
        hs = final_hidden(student, batch["input_ids"], batch["attention_mask"])[:, :-1][valid]
        ws = lm_head_weight(student)
        dense = float(fkl.from_hidden(hs, ws, ht, wt, targets[valid]))
        for k in args.k:
            ids, logprobs, tail = teacher_topk(ht, wt, k)
            stored = logprobs.to(DTYPES[args.dtype]).float()
            sparse = float(fkl.from_hidden(hs, ws, SparseTeacher(ids.long(), stored, tail), None, targets[valid]))
            mass = float(logprobs.exp().sum(-1).mean())
            size = k * (4 + DTYPES[args.dtype].itemsize) + 4
            print(f"| {name} | {k} | {size} | {mass:.4f} | {dense:.4f} | {sparse:.4f} | {abs(sparse - dense):.4f} | "
                  f"{abs(sparse - dense) / dense:.2%} |")
    print(f"\n(dense fp32 logits for comparison: {4 * wt.shape[0]:,} bytes per token)")


if __name__ == "__main__":
    main()
