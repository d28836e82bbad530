"""The output directory: one run at a time, no silent mixing of runs, exact resume after faults, nothing lost."""

import errno
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distillzoo as dz
from distillzoo.atomic import sweep_temporaries
from distillzoo.training.run_dir import RunDir
from distillzoo import train
from helpers import write_jsonl

STUDENT = {"hidden_size": 32, "num_layers": 1, "seed": 0}
TEACHER = {"hidden_size": 48, "num_layers": 1, "seed": 1}


def config(tmp_path, name="run", **train_kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / "train.jsonl", [
        {"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                     {"role": "assistant", "content": str(a + 1)}]} for a in range(10)])
    return {"objective": {"name": "fkl"}, "seed": 0, "student": {"tiny": dict(STUDENT)},
            "teacher": {"tiny": dict(TEACHER)},
            "data": {"streams": [{"name": "s", "path": str(data), "format": "chat", "repeat": 1}], "system": None},
            "train": {"steps": 6, "batch_size": 2, "lr": 1e-2, "log_every": 1, "checkpoint_every": 2,
                      "progress": False, **train_kw},
            "output_dir": str(tmp_path / name), "resume": "auto"}


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def weights(run):
    return load_file(Path(run) / "final" / "model.safetensors")


def same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=atol)


def leftovers(run):
    return sorted(str(p.relative_to(run)) for p in Path(run).rglob("*") if p.name.endswith((".tmp", ".old")))


def snapshot(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in Path(run).rglob("*") if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted run every resumed one must reach."""
    root = tmp_path_factory.mktemp("straight")
    return train(dz.load_config(config(root))).output_dir


def test_a_second_run_on_the_same_output_dir_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    raw = config(tmp_path, steps=1)
    held = RunDir(raw["output_dir"])
    with held.owned():
        with pytest.raises(dz.ConfigError, match=r"output_dir: '.*run' is in use by another distillzoo train \(pid "
                                                 r"\d+\); wait for it, or give this run its own output_dir"):
            train(dz.load_config(raw))
    # a process that holds the lock and is killed leaves nothing stuck
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from distillzoo.training.run_dir import RunDir\n"
                               "with RunDir(sys.argv[1]).owned():\n    print('held', flush=True); time.sleep(60)",
                               raw["output_dir"]], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert train(dz.load_config(raw)).steps == 1


def test_resuming_with_another_config_is_refused_naming_the_keys_and_loses_nothing(tmp_path):
    raw = config(tmp_path, steps=4)
    train(dz.load_config(raw))
    before = snapshot(raw["output_dir"])
    other = dict(raw, objective={"name": "rkl"})
    other["student"] = {"tiny": dict(STUDENT, hidden_size=48)}
    with pytest.raises(dz.ConfigError, match=r"resume: cannot resume from step-00000002: '.*run' holds a run with "
                                             r"another config \(objective.name: 'fkl' there, 'rkl' here; "
                                             r"student.tiny.hidden_size: 32 there, 48 here\)"):
        train(dz.load_config(other))
    assert snapshot(raw["output_dir"]) == before
    # what may change on a resume: how long it runs, how often it logs and checkpoints
    longer = dict(raw, train=dict(raw["train"], steps=5, log_every=2))
    assert train(dz.load_config(longer)).steps == 5


def test_a_finished_run_without_checkpoints_is_not_appended_to(tmp_path):
    raw = config(tmp_path, steps=3, checkpoint_every=0)
    train(dz.load_config(raw))
    before = snapshot(raw["output_dir"])
    with pytest.raises(dz.ConfigError, match=r"resume: '.*run' holds a finished run \(final/\) and no checkpoint to "
                                             r"resume from; give this run another output_dir, or set resume: never"):
        train(dz.load_config(raw))
    assert snapshot(raw["output_dir"]) == before
    train(dz.load_config(dict(raw, resume="never")))  # replaces it: each step once
    assert [r["step"] for r in metrics(raw["output_dir"])] == [1, 2, 3]


def test_a_run_killed_before_its_first_checkpoint_starts_over_with_each_step_logged_once(tmp_path):
    raw = config(tmp_path, steps=3, checkpoint_every=0)
    run = Path(raw["output_dir"])
    train(dz.load_config(raw))
    shutil.rmtree(run / "final")  # as if killed before the final save
    train(dz.load_config(raw))
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]


def test_a_half_written_metrics_line_is_repaired_on_resume(tmp_path, straight):
    raw = config(tmp_path)
    run = Path(raw["output_dir"])
    train(dz.load_config(raw))
    shutil.rmtree(run / "final")  # as if killed in the final save, after checkpoint 4
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 7, "loss": 0.3')  # a line a full disk cut off
    train(dz.load_config(raw))
    rows = metrics(run)  # every line parses
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    same_weights(weights(straight), weights(run))


def test_a_corrupt_newest_checkpoint_falls_back_to_the_one_before(tmp_path, straight, capsys):
    raw = config(tmp_path)
    run = Path(raw["output_dir"])
    train(dz.load_config(raw))  # checkpoints at 2 and 4
    shutil.rmtree(run / "final")
    newest = run / "checkpoints" / "step-00000004" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torn
    result = train(dz.load_config(raw))
    err = capsys.readouterr().err
    assert "checkpoint" in err and "step-00000004 is damaged" in err and "resumed from" in err and "step-00000002" in err
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5, 6]
    same_weights(weights(straight), weights(result.output_dir))


def test_stale_temporaries_are_swept_and_a_moved_aside_final_is_put_back(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / ".step-00000004.k2j3.tmp").mkdir(parents=True)
    (run / ".final.ab12.tmp").mkdir()
    (run / ".metrics.jsonl.x1.tmp").write_text("{}")
    (run / ".final.old").mkdir()  # killed between the two renames of an atomic directory write
    (run / ".final.old" / "config.json").write_text("{}")
    with RunDir(run).owned():
        pass
    assert leftovers(run) == [] and (run / "final" / "config.json").is_file()
    (run / ".final.old").mkdir()  # now final exists: the old copy is the stale one
    assert sweep_temporaries(run, "final") == [run / ".final.old"] and not (run / ".final.old").exists()


def test_an_output_dir_that_cannot_be_written_fails_before_any_model(tmp_path, no_models):
    (tmp_path / "a-file").write_text("x")
    raw = config(tmp_path)
    raw["output_dir"] = str(tmp_path / "a-file" / "run")
    with pytest.raises(dz.ConfigError, match=r"output_dir: '.*a-file/run' cannot be created: '.*a-file' is a file"):
        train(dz.load_config(raw))


def test_too_little_disk_space_is_refused_before_any_model(tmp_path, monkeypatch, no_models):
    import distillzoo.training.run_dir as run_dir

    class Usage:
        free = 1 << 20

    monkeypatch.setattr(run_dir.shutil, "disk_usage", lambda path: Usage)
    raw = config(tmp_path)
    with pytest.raises(dz.ConfigError, match=r"output_dir: '.*run' has 0.00 GiB free but this run writes about "
                                             r"0.\d+ GiB \(the final student and 2 checkpoints"):
        train(dz.load_config(raw))
    assert not (Path(raw["output_dir"]) / "metrics.jsonl").exists()


def test_the_space_estimate_counts_the_parameters_the_model_will_have(tmp_path):
    from distillzoo.models.causal_lm import model_from_config, parameter_count

    student = dz.load_config(config(tmp_path)).student
    built = model_from_config(student, "student")
    assert parameter_count(student) == sum(p.numel() for p in built.parameters()) > 151_936 * 32  # tied: once
    built.save_pretrained(tmp_path / "saved")
    from_path = dz.load_config({**config(tmp_path), "student": {"path": str(tmp_path / "saved")}}).student
    assert parameter_count(from_path) == parameter_count(student)


def test_a_full_disk_at_the_final_save_says_what_is_intact_and_leaves_no_partial_student(tmp_path, monkeypatch):
    import distillzoo.training.checkpoint as checkpoint

    def full_disk(student, weights, directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_pretrained", full_disk)
    raw = config(tmp_path, steps=3)
    with pytest.raises(dz.DistillzooError, match=r"could not write the final student \(final/\) in .*run \(the disk is "
                                                 r"full\); nothing half-written was left; the newest checkpoint, "
                                                 r".*step-00000002, is intact: rerun with resume: auto"):
        train(dz.load_config(raw))
    run = Path(raw["output_dir"])
    assert not (run / "final").exists() and leftovers(run) == []
    monkeypatch.undo()
    assert train(dz.load_config(raw)).steps == 3  # and the rerun finishes from the checkpoint


def test_sigkill_in_steps_checkpoint_writes_and_the_final_save_then_resume_reaches_the_uninterrupted_run(tmp_path,
                                                                                                        straight):
    """Each child is killed while a step runs, while a checkpoint is being written, or in the final save (a random
    moment of it); the next resumes. The last one finishes: the uninterrupted weights, each step logged once."""
    raw = config(tmp_path)
    run = Path(raw["output_dir"])
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(raw))
    rng = random.Random(0)

    def logged():
        try:  # a child that finds no intact checkpoint starts over and removes the file: none yet, then
            text = (run / "metrics.jsonl").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line)["step"] for line in text.splitlines() if line.endswith("}")]

    events = {  # what must be true when the kill lands
        "checkpoint write": lambda: any((run / "checkpoints").glob(".step-*.tmp")),
        "step": lambda: max(logged(), default=0) >= plan_step,  # one read: a resuming child rewrites the file
        "final save": lambda: any(run.glob(".final.*.tmp")),
    }
    plans = [("checkpoint write", 0), ("step", 3), ("checkpoint write", 0), ("step", 5), ("final save", 0),
             ("final save", 0), (None, 0)]
    killed = []
    for event, plan_step in plans:
        for _ in range(3):  # a short write can finish between two polls; then the next child tries again
            child = subprocess.Popen([sys.executable, "-m", "distillzoo", "train", str(cfg_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if event is None:
                assert child.wait(timeout=300) == 0
                break
            deadline = time.time() + 300
            while child.poll() is None and not events[event]():
                assert time.time() < deadline, f"no {event} happened"
                time.sleep(0.002)
            time.sleep(rng.uniform(0.0, 0.005))
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
                child.wait()
                killed.append(event)
                break
            assert child.returncode == 0
    assert killed == [e for e, _ in plans if e is not None]
    assert [r["step"] for r in metrics(run)] == list(range(1, 7))
    assert [r["loss"] for r in metrics(run)] == pytest.approx([r["loss"] for r in metrics(straight)], rel=1e-6)
    same_weights(weights(straight), weights(run))
    assert leftovers(run) == []
