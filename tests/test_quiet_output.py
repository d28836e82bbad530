"""What a command prints: its own lines, and with progress on its own bar; no third-party bars or FutureWarnings."""

import json
import re
import subprocess
import sys

import pytest

from helpers import write_jsonl

#: what transformers and peft print around our calls unless told not to
NOISE = ("Loading weights", "Writing model shards", "FutureWarning", "Warning")


def lora_run(tmp_path, progress):
    """A tiny ``distillzoo train`` config: a LoRA student (peft), a teacher loaded from a saved directory."""
    from distillzoo.models.causal_lm import tiny_qwen2

    teacher = tmp_path / "teacher"
    if not teacher.is_dir():
        tiny_qwen2(hidden_size=48, num_layers=1, seed=1, tie_word_embeddings=True).save_pretrained(teacher)
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"id": f"q{a}", "messages": [{"role": "user", "content": f"What is {a} + 2?"},
                                     {"role": "assistant", "content": str(a + 2)}]} for a in range(4)])
    cfg = tmp_path / f"progress-{progress}.yaml"
    cfg.write_text(json.dumps({
        "objective": {"name": "fkl"},
        "student": {"tiny": {"hidden_size": 32, "num_layers": 1, "seed": 0}, "lora": {"r": 4, "alpha": 8}},
        "teacher": {"path": str(teacher)},
        "data": {"streams": [{"name": "s", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
        "train": {"steps": 2, "batch_size": 4, "log_every": 1, "progress": progress},
        "output_dir": str(tmp_path / f"run-{progress}")}))
    return subprocess.run([sys.executable, "-m", "distillzoo", "train", str(cfg)], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("progress", [False, True])
def test_train_with_a_lora_student_and_a_saved_teacher_prints_only_its_own_lines(tmp_path, progress):
    pytest.importorskip("peft")
    done = lora_run(tmp_path, progress)
    assert done.returncode == 0, done.stderr[-3000:]
    final = re.escape(str(tmp_path / f"run-{progress}" / "final"))
    assert re.fullmatch(rf"trained 2 steps; final loss [\d.]+; student saved to {final}\n", done.stdout)
    for noise in NOISE:
        assert noise not in done.stdout + done.stderr, f"{noise!r} in the output of distillzoo train"
    bars = {m.group(1) for m in re.finditer(r"([^\r\n]*?):\s+\d+%\|", done.stderr)}  # tqdm's "DESC:  50%|"
    assert bars == ({"distillzoo train (distill)"} if progress else set())
    if not progress:
        assert done.stderr == ""


def test_loading_and_saving_a_model_leave_transformers_bars_as_they_found_them(tmp_path, capsys):
    from transformers.utils import logging as transformers_logging

    from distillzoo.models.causal_lm import load_causal_lm, tiny_qwen2
    from distillzoo.training.checkpoint import save_pretrained

    before = transformers_logging.is_progress_bar_enabled()
    try:
        for enabled in (True, False):  # a user's own from_pretrained keeps its bar; one who switched them off
            (transformers_logging.enable_progress_bar if enabled else transformers_logging.disable_progress_bar)()
            save_pretrained(tiny_qwen2(hidden_size=32, num_layers=1), None, tmp_path / "m")
            assert transformers_logging.is_progress_bar_enabled() == enabled
            load_causal_lm(str(tmp_path / "m"))
            assert transformers_logging.is_progress_bar_enabled() == enabled
    finally:
        (transformers_logging.enable_progress_bar if before else transformers_logging.disable_progress_bar)()
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "Writing model shards" not in err
