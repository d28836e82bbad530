"""DPO on preference JSONL with the reference scored once into a cache, then a few training steps.

    python examples/dpo_with_reference_cache.py

Tiny randomly initialised Qwen2-architecture models (the real vocab, 151,936) stand
in for a Qwen student and its reference; swap in ``dz.causal_lm.load_causal_lm(DIR)``
for real checkpoints. The steps: write preference records (strings and chat
messages), tokenize them with the embedded Qwen tokenizer and ChatML, score every
pair under the reference into ``ref.jsonl`` (the reference can then leave memory),
and train the policy with dpo, checking the fused loss against the naive one.
"""

import json
import tempfile
from pathlib import Path

import torch

import distillzoo as dz
from distillzoo.models.causal_lm import tiny_qwen2

RECORDS = [
    {"prompt": "What is the capital of France?", "chosen": "Paris.", "rejected": "It is Lyon."},
    {"prompt": "2 + 2 = ?", "chosen": "4", "rejected": "22"},
    {"prompt": [{"role": "user", "content": "Translate 'thank you' into Chinese."}],
     "chosen": [{"role": "assistant", "content": "谢谢"}], "rejected": [{"role": "assistant", "content": "你好"}]},
    {"prompt": "Name a prime number above 10.", "chosen": "11", "rejected": "12"},
]


def main(steps: int = 4) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data_path = Path(tmp) / "prefs.jsonl"
        data_path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS), encoding="utf-8")
        data = dz.PreferenceDataset(data_path, max_length=256)
        reference = tiny_qwen2(seed=1)
        cache = dz.write_reference_cache(Path(tmp) / "ref.jsonl", reference, data, model_name="tiny-reference")
        del reference  # the cache replaces it from here on
        data.attach_reference(cache)
        print(f"{len(data)} pairs, reference log-probs cached for {len(cache)} ids")

        policy = tiny_qwen2(seed=1)  # starts equal to the reference: rewards begin at 0
        dpo = dz.build_objective(dz.load_config({"objective": {"name": "dpo", "beta": 0.1}}))
        optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
        batch = dz.collate_preference([data[i] for i in range(len(data))], data.tokenizer.pad_id)
        naive = dz.preference_step(dpo, policy, batch, fused=False).loss.item()
        history = []
        for step in range(steps):
            out = dz.preference_step(dpo, policy, batch)
            if step == 0:
                print(f"fused loss {out.loss.item():.6f} == naive loss {naive:.6f} (ln 2 = 0.693147 at the start)")
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            metrics = {k: round(float(v), 4) for k, v in out.metrics.items()}
            history.append(metrics)
            print(f"step {step}: loss {metrics['loss']:.4f}  margin {metrics['rewards/margins']:+.4f}  "
                  f"accuracy {metrics['rewards/accuracies']:.2f}")
    return {"naive_first_loss": naive, "history": history}


if __name__ == "__main__":
    main()
