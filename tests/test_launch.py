"""The teacher-side commands under torchrun: two gloo processes write what one process writes, byte for byte,
also when one rank is SIGKILLed and the command is run again; a teacher spread over CPU and disk by max_memory
gives the same cache as one loaded whole."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import distillzoo as dz
from distillzoo.cli import main
from helpers import write_jsonl

ANSWERS = ["7", "13", "forty-two", "七", "0129", "5183", "1358", "四十二", "ninety-nine", "3", "100", "十"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Instruction records, preference pairs, a saved tiny teacher and student, and the configs that use them."""
    from distillzoo.models.causal_lm import tiny_qwen2

    root = tmp_path_factory.mktemp("launch")
    records = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Question {i}: what comes next? " * 2},
                                            {"role": "assistant", "content": f"{a} " * 6}]}
               for i, a in enumerate(ANSWERS * 2)]
    chat = write_jsonl(root / "chat.jsonl", records)
    pairs = write_jsonl(root / "pairs.jsonl", [{"id": r["id"], "prompt": r["messages"][0]["content"],
                                                "chosen": r["messages"][1]["content"], "rejected": "no"}
                                               for r in records])
    teacher, student = root / "teacher", root / "student"
    tiny_qwen2(hidden_size=48, num_layers=2, seed=3).save_pretrained(teacher)
    tiny_qwen2(hidden_size=32, num_layers=1, seed=4).save_pretrained(student)
    return {"root": root, "chat": chat, "pairs": pairs, "teacher": teacher, "student": student}


def command(setup, name, out):
    """argv (after ``distillzoo``) of one teacher-side command writing to ``out``."""
    s = setup
    if name == "cache-teacher":
        return ["cache-teacher", str(s["teacher"]), str(s["chat"]), "--format", "chat", "--no-system", "--k", "8",
                "--batch-size", "2", "--shard-size", "2", "--out", str(out)]
    if name == "reference-cache":
        return ["reference-cache", str(s["teacher"]), str(s["pairs"]), "--batch-size", "2", "--out", str(out)]
    section = {"generate": {"prompts": str(s["chat"]), "format": "chat", "out": str(out), "max_new_tokens": 24,
                            "temperature": 1.0, "batch_size": 1, "progress": False},
               "score": {"data": str(s["chat"]), "format": "chat", "out": str(out), "scorer": {"name": "mfd"},
                         "batch_size": 1, "progress": False}}[name]
    config = Path(f"{out}.yaml")
    config.write_text(json.dumps({"teacher": {"path": str(s["teacher"])}, "student": {"path": str(s["student"])},
                                  "data": {"system": None}, "seed": 5, name: section}))
    return [name, str(config)]


def torchrun(argv, **popen):
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "distillzoo", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **popen)


def finish(process, timeout=300, what=""):
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, f"{what}: {err[-6000:]}"
    return out


def contents(out: Path) -> dict:
    """Every file of an output (a file, or a cache directory), as bytes."""
    if out.is_file():
        return {"": out.read_bytes()}
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


NAMES = ("cache-teacher", "generate", "score", "reference-cache")


@pytest.fixture(scope="module")
def one_process(setup, tmp_path_factory):
    """Each command's output from one process (the reference every launch must equal)."""
    root = tmp_path_factory.mktemp("one")
    outputs = {}
    for name in NAMES:
        out = root / name
        assert main(command(setup, name, out)) == 0
        outputs[name] = contents(out)
    return outputs


def test_two_gloo_processes_write_what_one_process_writes(setup, one_process, tmp_path):
    for name in NAMES:
        out = tmp_path / name
        printed = finish(torchrun(command(setup, name, out)), what=name)
        assert contents(out) == one_process[name], name
        assert not list(tmp_path.glob(f"{name}.part-*")), name  # merged and removed
        assert len(printed.strip().splitlines()) == 1, (name, printed)  # rank 0 reports for both
    cache = json.loads(one_process["cache-teacher"]["manifest.json"])
    assert cache["samples"] == 24 and len({k.split("/")[0] for k in one_process["cache-teacher"]}) == 13  # 12 shards


def ranks_of(launcher: int) -> dict[int, int]:
    """``{rank: pid}`` of the processes a torchrun agent started."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            parent = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
            env = dict(item.split("=", 1) for item in (proc / "environ").read_bytes().decode(errors="replace")
                       .split("\0") if "=" in item)
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher and "RANK" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


@pytest.mark.parametrize("name, started", [
    ("cache-teacher", lambda out: (out / "shard-00001").is_dir()),  # rank 1's first shard
    ("generate", lambda out: Path(f"{out}.part-1").is_file() and Path(f"{out}.part-1").read_text().count("\n") >= 1),
    ("score", lambda out: Path(f"{out}.part-1").is_file() and Path(f"{out}.part-1").read_text().count("\n") >= 1),
])
def test_a_rank_killed_mid_run_then_a_rerun_writes_what_one_process_writes(setup, one_process, tmp_path, name,
                                                                           started):
    for attempt in range(3):  # rank 1 must be killed after its first unit and before its last
        out = tmp_path / f"{name}-{attempt}"
        launcher = torchrun(command(setup, name, out))
        deadline = time.monotonic() + 120
        while launcher.poll() is None and not started(out) and time.monotonic() < deadline:
            time.sleep(0.005)
        ranks = ranks_of(launcher.pid)
        if 1 in ranks and launcher.poll() is None:
            os.kill(ranks[1], signal.SIGKILL)
        launcher.communicate(timeout=120)
        whole = (out / "manifest.json").is_file() and len(list(out.glob("shard-*"))) == 12 if name == "cache-teacher" \
            else out.is_file()
        if launcher.returncode != 0 and not whole:
            break
    else:
        pytest.fail("rank 1 finished before it could be killed, three times")
    finish(torchrun(command(setup, name, out)))
    assert contents(out) == one_process[name]
    assert not list(tmp_path.glob("*.part-*")) and not list(out.parent.glob(f".{out.name}*"))


def test_a_teacher_spread_over_cpu_and_disk_caches_what_one_loaded_whole_caches(setup, one_process, tmp_path):
    from distillzoo.models.causal_lm import load_causal_lm
    from distillzoo.models.placement import device_map

    whole = load_causal_lm(str(setup["teacher"]))
    size = lambda module: sum(t.numel() * t.element_size()  # noqa: E731
                              for t in [*module.parameters(), *module.buffers()])
    resident = sum(size(m) for m in (whole.model.embed_tokens, whole.model.norm, whole.model.rotary_emb, whole.lm_head))
    layer = size(whole.model.layers[0])
    assert device_map(str(setup["teacher"]), {"cpu": resident + layer}, gpus=[]) == {
        "model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu",
        "model.layers.0": "cpu", "model.layers.1": "disk"}  # the head stays; the layers fill the budget in order
    budget = f"cpu={resident + 1000}"  # the head alone fits: both layers go to disk
    assert {device_map(str(setup["teacher"]), {"cpu": resident + 1000}, gpus=[])[f"model.layers.{i}"]
            for i in (0, 1)} == {"disk"}
    placed = load_causal_lm(str(setup["teacher"]), max_memory=budget)
    assert placed.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # offloaded, brought in to run
    out = tmp_path / "cache"
    assert main(command(setup, "cache-teacher", out) + ["--max-memory", budget]) == 0
    assert contents(out) == one_process["cache-teacher"]
    with pytest.raises(dz.ConfigError, match=r"the embeddings, final norm and lm_head \(0.05 GiB\) stay whole on the "
                                             r"CPU, whose budget is 0.00 GiB"):
        device_map(str(setup["teacher"]), {"cpu": 1000}, gpus=[])
