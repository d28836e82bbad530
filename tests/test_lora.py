"""LoRA students: distillzoo train against peft's own model trained by a hand loop, exact resume, the merged model,
two gloo processes, and the configs refused before any model loads."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distillzoo as dz
from distillzoo import train
from helpers import assert_trained_alike, train_killed_at_checkpoint, write_jsonl

peft = pytest.importorskip("peft")

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]}


def chat(n=4):
    return [{"id": f"q{a}", "messages": [{"role": "user", "content": f"What is {a} + {a + 2}?"},
                                         {"role": "assistant", "content": str(2 * a + 2)}]} for a in range(n)]


def config(root, **train_kw):
    root.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(root / "train.jsonl", chat())
    return {"objective": {"name": "fkl"},
            "student": {"tiny": {"hidden_size": 32, "num_layers": 2, "seed": 0}, "lora": dict(LORA)},
            "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 1}},
            "data": {"streams": [{"name": "s", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
            "train": {"steps": 4, "batch_size": 4, "lr": 2e-2, "min_lr_ratio": 1.0, "max_grad_norm": None,
                      "log_every": 1, "progress": False, **train_kw},
            "output_dir": str(root / "run"), "seed": 3}


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def adapters(run):
    return load_file(Path(run) / "final" / "adapter" / "adapter_model.safetensors")


def test_training_equals_peft_s_own_model_trained_by_a_hand_loop(tmp_path, tok):
    from peft import LoraConfig, get_peft_model

    from distillzoo.models.causal_lm import tiny_qwen2
    from distillzoo.data.shards import ConversationDataset, collate_sft

    raw = config(tmp_path)
    result = train(dz.load_config(raw))
    logged = [r["loss"] for r in metrics(result.output_dir)]

    # the reference: peft on the same tiny model, adapters drawn right after seeding with the run's seed,
    # every step on the whole data set (the run's batch is all four examples, in some order), plain autograd
    student = tiny_qwen2(hidden_size=32, num_layers=2, seed=0, tie_word_embeddings=True)
    torch.manual_seed(raw["seed"])
    student = get_peft_model(student, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                 target_modules=LORA["target_modules"]))
    teacher = tiny_qwen2(hidden_size=48, num_layers=1, seed=1, tie_word_embeddings=True).eval()
    batch = collate_sft(list(ConversationDataset(raw["data"]["streams"][0]["path"], "chat", tok, system=None)),
                        tok.pad_id)
    targets = batch["labels"][:, 1:]
    valid = targets != -100
    trainable = [p for p in student.parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=2e-2, weight_decay=0.0)
    expected = []
    for _ in range(4):
        log_q = torch.log_softmax(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                  .logits[:, :-1][valid].float(), -1)
        with torch.no_grad():
            log_p = torch.log_softmax(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                      .logits[:, :-1][valid].float(), -1)
        loss = (log_p.exp() * (log_p - log_q)).sum() / valid.sum()
        expected.append(float(loss.detach()))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert logged == pytest.approx(expected, abs=1e-5)
    assert logged[-1] < logged[0]
    mine = adapters(result.output_dir)
    theirs = {k: v for k, v in student.state_dict().items() if "lora_" in k}
    assert len(mine) == len(theirs) == 2 * 2 * len(LORA["target_modules"])  # A and B, per target, per layer
    # Adam amplifies rounding where a gradient is near 0 (whole-batch logits there, the CPU's column path here)
    assert_trained_alike({k.replace(".default", ""): v for k, v in theirs.items()}, mine, lr=2e-2, atol=1e-4)


def test_the_merged_model_loads_and_gives_the_logits_of_base_plus_adapter(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from distillzoo.models.causal_lm import tiny_qwen2

    result = train(dz.load_config(config(tmp_path)))
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "final").eval()
    base = tiny_qwen2(hidden_size=32, num_layers=2, seed=0, tie_word_embeddings=True)
    with_adapter = PeftModel.from_pretrained(base, result.output_dir / "final" / "adapter").eval()
    ids = torch.tensor([[151644, 872, 198, 3838, 374, 220, 17, 488, 220, 19, 30, 151645]])
    with torch.no_grad():
        got, want = merged(input_ids=ids).logits, with_adapter(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    fresh = tiny_qwen2(hidden_size=32, num_layers=2, seed=0, tie_word_embeddings=True).eval()
    with torch.no_grad():
        assert (fresh(input_ids=ids).logits - got).abs().max() > 1e-3  # the adapters did change the model


def test_a_killed_lora_run_resumes_to_the_uninterrupted_adapters_from_adapter_only_checkpoints(tmp_path):
    straight = train(dz.load_config(config(tmp_path / "straight", steps=10, checkpoint_every=3)))
    raw = config(tmp_path / "killed", steps=10, checkpoint_every=3)
    path = tmp_path / "killed.yaml"
    path.write_text(json.dumps(raw))
    run = Path(raw["output_dir"])
    train_killed_at_checkpoint(path, run, 6)
    state = torch.load(run / "checkpoints" / "step-00000006" / "state.pt", weights_only=False)
    assert state["model"] and all("lora_" in key for key in state["model"])  # the frozen base is not stored
    resumed = train(dz.load_config(path))
    assert [r["step"] for r in metrics(run)] == list(range(1, 11))
    assert [r["loss"] for r in metrics(run)] == pytest.approx([r["loss"] for r in metrics(straight.output_dir)],
                                                             rel=1e-6)
    a, b = adapters(straight.output_dir), adapters(resumed.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6)


def test_two_gloo_processes_follow_the_one_process_lora_run(tmp_path):
    one = train(dz.load_config(config(tmp_path / "one")))
    raw = config(tmp_path / "two")
    path = tmp_path / "two.yaml"
    path.write_text(json.dumps(raw))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "distillzoo",
                           "train", str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-5000:]
    assert [r["loss"] for r in metrics(raw["output_dir"])] == pytest.approx([r["loss"] for r in
                                                                             metrics(one.output_dir)], abs=1e-6)
    assert_trained_alike(adapters(one.output_dir), adapters(raw["output_dir"]), lr=2e-2)


@pytest.mark.parametrize("change, message", [
    (lambda c: c["student"]["lora"].update(target_modules=["q_proj", "lm_head"]),
     r"student.lora.target_modules: 'lm_head' is the lm_head, whose weight the fused losses read directly"),
    (lambda c: c["student"]["lora"].update(target_modules=["embed_tokens"]),
     r"'embed_tokens' is the lm_head \(tied to the input embeddings\)"),
    (lambda c: c["student"]["lora"].update(train_head=True),
     r"student.lora.train_head: the student ties its lm_head to its input embeddings"),
    (lambda c: c["student"]["lora"].update(rank=4), r"student.lora: unknown key\(s\) \['rank'\]"),
    (lambda c: c["student"]["lora"].update(r=0), r"student.lora.r: 0 must be an integer >= 1"),
    (lambda c: c["teacher"].update(lora=dict(LORA)), r"teacher.lora: LoRA adapters are for the student"),
    (lambda c: c["train"].update(parallel="fsdp"), r"train.parallel: a LoRA student trains under ddp"),
])
def test_a_bad_lora_config_is_refused_before_any_model_loads(tmp_path, no_models, change, message):
    raw = config(tmp_path)
    change(raw)
    with pytest.raises(dz.ConfigError, match=message):
        train(dz.load_config(raw))


def test_an_untied_student_may_train_its_head_in_full_and_its_merged_model_keeps_it(tmp_path):
    from transformers import AutoModelForCausalLM

    raw = config(tmp_path)
    raw["student"]["tiny"]["tie_word_embeddings"] = False
    raw["student"]["lora"]["train_head"] = True
    result = train(dz.load_config(raw))
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir / "final")
    from distillzoo.models.causal_lm import tiny_qwen2

    fresh = tiny_qwen2(hidden_size=32, num_layers=2, seed=0, tie_word_embeddings=False)
    assert (merged.lm_head.weight - fresh.lm_head.weight).abs().max() > 1e-4  # the head was trained ...
    torch.testing.assert_close(merged.model.embed_tokens.weight, fresh.model.embed_tokens.weight)  # ... and only it
