"""A side file of reference (or teacher) log-probs keyed by sample id.

DPO-style objectives need ``log rho(y)`` of a frozen model for every response;
computing them once, before training, means that model need not sit in memory
(or run) while the policy trains. The file is JSONL: a header line, then one
line per pair::

    {"distillzoo_reference_cache": 1, "model": "...", "pairs": 2}
    {"id": "a1", "chosen": -12.25, "rejected": -20.5, "chosen_tokens": 9, "rejected_tokens": 14}

The token counts let a run check that it tokenizes exactly as the cache's run
did (same tokenizer, template, max_length). The pairs are appended to a part
file a batch at a time (one part per rank under torchrun, each rank scoring every
``world``-th batch), and the cache is written from the parts under a temporary
name and renamed, so a crash never leaves a partial cache and a rerun scores only
the pairs not yet in a part (see :mod:`distillzoo.teacher.parts`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from distillzoo.errors import DataError

FORMAT_VERSION = 1


class ReferenceCache:
    """id -> (chosen, rejected, chosen_tokens, rejected_tokens), read from a cache file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"reference cache {str(self.path)!r} does not exist; write it with "
                            "distillzoo.write_reference_cache")
        self.entries: dict[str, tuple[float, float, int, int]] = {}
        with self.path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                where = f"{self.path}:{number}"
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                if number == 1:
                    if not isinstance(record, dict) or record.get("distillzoo_reference_cache") != FORMAT_VERSION:
                        raise DataError(f"{where}: not a distillzoo reference cache (no header line "
                                        f"{{\"distillzoo_reference_cache\": {FORMAT_VERSION}, ...}})")
                    self.header = record
                    continue
                try:
                    key = str(record["id"])
                    values = (float(record["chosen"]), float(record["rejected"]),
                              int(record["chosen_tokens"]), int(record["rejected_tokens"]))
                except (KeyError, TypeError, ValueError) as e:
                    raise DataError(f"{where}: a cache line needs id, chosen, rejected, chosen_tokens, "
                                    f"rejected_tokens ({type(e).__name__}: {e})") from None
                if not (math.isfinite(values[0]) and math.isfinite(values[1])):
                    raise DataError(f"{where}: log-probs of id {key!r} are not finite: {values[:2]}")
                if key in self.entries:
                    raise DataError(f"{where}: id {key!r} appears twice in the cache")
                self.entries[key] = values
        if not hasattr(self, "header"):
            raise DataError(f"{self.path}: empty file, not a distillzoo reference cache")

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, key: str, chosen_tokens: int, rejected_tokens: int, where: str = "") -> tuple[float, float]:
        """The reference log-probs of pair ``key``; its token counts must match this run's."""
        prefix = f"{where}: " if where else ""
        if key not in self.entries:
            raise DataError(f"{prefix}id {key!r} is not in the reference cache {str(self.path)!r} "
                            f"({len(self)} ids); rebuild the cache for this data")
        chosen, rejected, n_chosen, n_rejected = self.entries[key]
        if (n_chosen, n_rejected) != (chosen_tokens, rejected_tokens):
            raise DataError(f"{prefix}id {key!r}: the reference cache scored {n_chosen}/{n_rejected} chosen/rejected "
                            f"tokens but this run has {chosen_tokens}/{rejected_tokens}; the cache was made with another "
                            "tokenizer, template or max_length")
        return chosen, rejected


@torch.no_grad()
def write_reference_cache(path: str | Path, model, dataset, *, batch_size: int = 8, model_name: str = "",
                          device=None, fused: bool = True, launch=None) -> ReferenceCache:
    """Score every pair of ``dataset`` (a PreferenceDataset) under ``model`` and write the cache atomically
    (resumable; under torchrun, ``launch``, each rank scores every ``world``-th batch)."""
    from distillzoo.models.causal_lm import model_fingerprint, sequence_logps
    from distillzoo.data.pairs import collate_preference
    from distillzoo.teacher.launch import Launch
    from distillzoo.teacher.parts import PartedOutput

    path = Path(path)
    launch = launch or Launch()
    device = device or next(model.parameters()).device
    header = json.dumps({"distillzoo_reference_cache": FORMAT_VERSION, "model": model_name or type(model).__name__,
                         "pairs": len(dataset)})
    output = PartedOutput(path, launch, header=header, identity={
        "model": model_name or type(model).__name__, "weights": model_fingerprint(model), "fused": fused,
        "pairs": len(dataset)})
    done = output.done()
    todo = [i for i in range(len(dataset)) if dataset[i].id not in done]
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    was_training = model.training
    model.eval()
    try:
        for b in launch.mine(len(batches)):
            batch = collate_preference([dataset[i] for i in batches[b]], dataset.tokenizer.pad_id).to(device)
            out = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.labels, fused=fused)
            n = batch.n_pairs
            logps, lengths = out.logps.double().cpu().tolist(), out.lengths.cpu().tolist()
            output.append([{"id": key, "chosen": logps[i], "rejected": logps[n + i], "chosen_tokens": lengths[i],
                            "rejected_tokens": lengths[n + i]} for i, key in enumerate(batch.ids)])
    finally:
        model.train(was_training)
    output.merge([ex.id for ex in dataset])
    return ReferenceCache(path)
