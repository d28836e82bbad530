"""Training algorithms and callbacks as plugins: selection by name, the checks before any model loads, callbacks."""

import json
from pathlib import Path

import pytest
import torch

import distillzoo as dz
from distillzoo.training.callbacks import Callbacks
from distillzoo import train
from helpers import write_jsonl

STUDENT = {"hidden_size": 32, "num_layers": 1, "seed": 0}
TEACHER = {"hidden_size": 48, "num_layers": 1, "seed": 1}


def chat(n=8):
    return [{"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},
                                         {"role": "assistant", "content": str(a + 1)}]} for a in range(n)]


def pairs(n=8):
    return [{"id": f"p{a}", "prompt": f"{a} + 1 = ?", "chosen": str(a + 1), "rejected": str(a + 2)} for a in range(n)]


def config(tmp_path, objective="fkl", fmt="chat", **train_kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(tmp_path / f"{fmt}.jsonl", chat() if fmt == "chat" else pairs())
    return {"objective": {"name": objective}, "seed": 0, "student": {"tiny": STUDENT}, "teacher": {"tiny": TEACHER},
            "data": {"streams": [{"name": "s", "path": str(data), "format": fmt, "repeat": 1}], "max_length": 64,
                     "system": None},
            "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1, "progress": False, **train_kw},
            "output_dir": str(tmp_path / "run"), "resume": "never"}


class Recorder(dz.Callback):
    """A throwaway callback: keeps every event it is given."""

    events = []

    def __init__(self, tag: str = "", every: int = 1):
        self.tag = tag

    def on_train_start(self, run):
        Recorder.events.append(("start", run.extra["step"], type(run.student).__name__))

    def on_log(self, step, record):
        Recorder.events.append(("log", step, dict(record)))

    def on_evaluate(self, step, metrics):
        Recorder.events.append(("evaluate", step, dict(metrics)))

    def on_checkpoint(self, step, path):
        Recorder.events.append(("checkpoint", step, (Path(path) / "state.pt").is_file()))

    def on_train_end(self, result):
        Recorder.events.append(("end", result.steps, (result.output_dir / "final" / "config.json").is_file()))


class CallbackPlugin:
    @dz.hookimpl
    def register_trainer_callbacks(self, register):
        register("recorder", Recorder, summary="keeps every event")


class CountingDistill(dz.Algorithm):
    """A throwaway third-party algorithm: ce on the data's replies, with state that checkpoints must keep."""

    name = "counting_ce"
    summary = "ce, counting the micro-batches it has seen"
    params = {"scale": {"type": "float", "default": 1.0, "range": "(0, inf)", "doc": "multiplies the loss"}}

    def __init__(self, objective, **params):
        super().__init__(objective, **params)
        self.seen = 0

    def micro_batches(self, run, examples, step, size):
        from distillzoo.training.algorithm import instruction_batches

        return instruction_batches(examples, size, run.tokenizer.pad_id, run.device)

    def loss(self, models, batch):
        from distillzoo.kernels import token_logprobs

        self.seen += 1
        x = batch.inputs
        hs, ws = models.hidden(models.student, x["input_ids"], x["attention_mask"]), models.head(models.student)
        nll = -token_logprobs(hs, ws, x["targets"]).sum()
        return dz.StepLoss(self.scale * nll, {"seen": torch.tensor(float(self.seen) * batch.count)})

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = state["seen"]


class AlgorithmPlugin:
    @dz.hookimpl
    def register_algorithms(self, register):
        register(CountingDistill)


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def test_a_callback_from_a_plugin_receives_every_logged_record_and_each_event(tmp_path, register_plugin):
    register_plugin(CallbackPlugin(), "recorder-plugin")
    Recorder.events = []
    raw = config(tmp_path, steps=5, log_every=2, checkpoint_every=2, eval_every=4)
    raw["data"]["eval"] = {"name": "e", "path": raw["data"]["streams"][0]["path"], "format": "chat"}
    raw["callbacks"] = [{"name": "recorder", "tag": "x"}]
    result = train(dz.load_config(raw))
    rows = metrics(result.output_dir)
    assert [r["step"] for r in rows] == [2, 4, 5]  # log_every=2, and the last step
    logged = [e[2] for e in Recorder.events if e[0] == "log"]
    assert logged == rows  # the very records metrics.jsonl holds
    assert Recorder.events[0] == ("start", 0, "Qwen2ForCausalLM")
    assert [e[:2] for e in Recorder.events if e[0] == "evaluate"] == [("evaluate", 4), ("evaluate", 5)]
    assert Recorder.events[[e[0] for e in Recorder.events].index("evaluate")][2].keys() == {
        "eval/nll", "eval/kl_teacher_student"}
    assert [e for e in Recorder.events if e[0] == "checkpoint"] == [("checkpoint", 2, True), ("checkpoint", 4, True)]
    assert Recorder.events[-1] == ("end", 5, True)


def test_callbacks_run_on_rank_zero_unless_they_ask_for_every_rank():
    class Everywhere(dz.Callback):
        all_ranks = True

        def __init__(self):
            self.seen = []

        def on_log(self, step, record):
            self.seen.append(step)

    here, everywhere = Recorder(), Everywhere()
    Recorder.events = []
    Callbacks([here, everywhere], rank=1).fire("on_log", 3, {"step": 3})
    assert everywhere.seen == [3] and Recorder.events == []
    Callbacks([here, everywhere], rank=0).fire("on_log", 4, {"step": 4})
    assert everywhere.seen == [3, 4] and Recorder.events == [("log", 4, {"step": 4})]


def test_a_third_party_algorithm_is_chosen_by_name_and_its_state_survives_a_resume(tmp_path, register_plugin):
    register_plugin(AlgorithmPlugin(), "counting-plugin")
    raw = config(tmp_path, "ce", steps=4, micro_batch_size=1, checkpoint_every=2, min_lr_ratio=1.0)
    raw.pop("teacher")  # nothing in counting_ce reads one
    raw["algorithm"] = {"name": "counting_ce", "scale": 2.0}
    raw["resume"] = "auto"
    straight = metrics(train(dz.load_config(raw)).output_dir)
    # two micro-batches a step: step k sees micro-batches 2k-1 and 2k (the metric is averaged over tokens)
    assert all(2 * k - 1 <= r["seen"] <= 2 * k for k, r in enumerate(straight, 1))
    rerun = dict(raw, output_dir=str(tmp_path / "resumed"))
    rerun["train"] = dict(raw["train"], steps=3)
    train(dz.load_config(rerun))  # checkpoints step 2, then finishes step 3
    rerun["train"]["steps"] = 4
    resumed = metrics(train(dz.load_config(rerun)).output_dir)  # resumes at step 2, where seen = 4
    assert [r["seen"] for r in resumed] == [r["seen"] for r in straight]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
    ce = metrics(train(dz.load_config({**raw, "algorithm": None, "resume": "never",
                                      "output_dir": str(tmp_path / "ce")})).output_dir)
    assert straight[0]["loss"] == pytest.approx(2 * ce[0]["loss"], rel=1e-6)  # scale=2 on the same first batch


def test_each_mixture_term_s_loss_is_logged_and_shown(tmp_path):
    from distillzoo.plugins.algorithms.distill import Distill
    from distillzoo.training.loop import _progress

    raw = config(tmp_path, steps=3, micro_batch_size=1)
    raw.pop("objective")
    raw["objectives"] = [{"name": "ce", "weight": 0.25}, {"name": "fkl", "weight": 0.75}]
    rows = metrics(train(dz.load_config(raw)).output_dir)
    for r in rows:  # every term's own per-token loss, weighted back into the logged total
        assert r["loss/ce"] > r["loss/fkl"] > 0
        assert 0.25 * r["loss/ce"] + 0.75 * r["loss/fkl"] == pytest.approx(r["loss"], rel=1e-6)
    shown = _progress(rows[-1], Distill)
    assert list(shown) == ["loss", "ce", "fkl", "tok_s"] and shown["fkl"] == f"{rows[-1]['loss/fkl']:.4f}"


def test_the_default_algorithm_follows_the_objective(tmp_path):
    from distillzoo.training.spec import build_algorithm

    for objective, fmt, name in [("fkl", "chat", "distill"), ("ce", "chat", "distill"), ("dpo", "preference", "preference"),
                                 ("simpo", "preference", "preference"), ("dpkd", "preference", "dpkd")]:
        algorithm, inferred = build_algorithm(dz.load_config(config(tmp_path / objective, objective, fmt)))
        assert (algorithm.name, inferred.name) == (name, objective)
    mixture = config(tmp_path / "mix")
    mixture.pop("objective")
    mixture["objectives"] = [{"name": "ce", "weight": 0.5}, {"name": "fkl", "weight": 0.5}]
    assert build_algorithm(dz.load_config(mixture))[0].name == "distill"


def bad(change, objective="fkl", fmt="chat"):
    def make(tmp_path):
        raw = config(tmp_path, objective, fmt)
        change(raw, tmp_path)
        return raw
    return make


@pytest.mark.parametrize("make, message", [
    # a preference algorithm given instruction data, and the reverse
    (bad(lambda c, p: None, "dpo", "chat"),
     r"objective.name: 'dpo' is a preference objective, trained by algorithm 'preference' on preference records, but "
     r"data.streams\[0\] \(format 'chat'\) holds instruction records; give preference data \(preference formats: "
     r"preference\)"),
    (bad(lambda c, p: c.update(algorithm={"name": "preference"}), "dpo", "chat"),
     r"data.streams\[0\]: format 'chat' holds instruction records, but algorithm 'preference' trains on preference "
     r"records \(preference formats: preference\)"),
    (bad(lambda c, p: None, "fkl", "preference"),
     r"objective.name: 'fkl' is a logit objective, trained by algorithm 'distill' on instruction records, but "
     r"data.streams\[0\] \(format 'preference'\) holds preference records; give instruction data \(instruction "
     r"formats: alpaca, chat, dolly\)"),
    (bad(lambda c, p: c.update(algorithm={"name": "dpkd", "online": True}), "dpkd", "preference"),
     r"data.streams\[0\]: format 'preference' holds preference records, but algorithm 'dpkd' trains on instruction"),
    (bad(lambda c, p: c["data"].update(eval={"name": "e", "path": c["data"]["streams"][0]["path"], "format": "chat"}),
         "dpo", "preference"),
     r"data.eval: format 'chat' holds instruction records, but algorithm 'preference' evaluates on preference records"),
    (bad(lambda c, p: c.update(algorithm={"name": "preference"}), "fkl", "chat"),
     r"objective.name: 'fkl' is a logit objective; algorithm 'preference' trains preference objectives "
     r"\(dpkd, dpo, simpo\)"),
    # a reference-free objective given a reference
    (bad(lambda c, p: c.update(reference={"tiny": STUDENT}), "simpo", "preference"),
     r"reference: a section is given, but objective 'simpo' is reference-free"),
    (bad(lambda c, p: c.update(algorithm={"name": "preference", "reference": "initial"}), "simpo", "preference"),
     r"algorithm.reference: 'initial' is given, but objective 'simpo' is reference-free; remove it \(algorithm.reference "
     r"takes only 'auto' here\)"),
    # an algorithm that needs a teacher but has none
    (bad(lambda c, p: c.pop("teacher"), "dpkd", "preference"),
     r"teacher: algorithm 'dpkd' \(the teacher is the reference and the author of y_w\) needs the teacher; give "
     r"teacher.path or teacher.tiny"),
    (bad(lambda c, p: (c.pop("teacher"), c.update(algorithm={"name": "preference", "reference": "teacher"})),
         "dpo", "preference"),
     r"teacher: algorithm.reference 'teacher' \(algorithm 'preference'\) needs the teacher"),
    (bad(lambda c, p: c.pop("teacher"), "fkl", "chat"), r"teacher: the objective needs a teacher"),
    # unknown names and params, with "did you mean"
    (bad(lambda c, p: c.update(algorithm={"name": "preferense"}), "dpo", "preference"),
     r"algorithm.name: unknown algorithm 'preferense'. Available: distill, dpkd, preference. Did you mean "
     r"'preference'\?"),
    (bad(lambda c, p: c.update(algorithm={"name": "dpkd", "onlin": True}), "dpkd", "preference"),
     r"algorithm.onlin \(algorithm 'dpkd'\): unknown parameter 'onlin'. Valid parameters: online, max_new_tokens, "
     r"temperature. Did you mean 'online'\?"),
    (bad(lambda c, p: c.update(algorithm={"name": "preference", "reference": "frozen"}), "dpo", "preference"),
     r"parameter 'reference' = 'frozen' is not one of \['auto', 'initial', 'teacher', 'model', 'cache', 'data'\]"),
    (bad(lambda c, p: c.update(callbacks=[{"name": "recordr"}])),
     r"callbacks\[0\].name: unknown callback 'recordr'. Available: mlflow, recorder, tensorboard. Did you mean 'recorder'\?"),
    (bad(lambda c, p: c.update(callbacks=[{"name": "recorder", "colour": "red"}])),
     r"callbacks\[0\]: callback 'recorder' \(package 'recorder-plugin'\) does not take these params: got an unexpected "
     r"keyword argument 'colour'"),
    (bad(lambda c, p: c.update(algorithm={"name": "preference", "reference": "model"}), "dpo", "preference"),
     r"reference: algorithm.reference 'model' needs a reference section"),
    (bad(lambda c, p: c.update(reference={"cache": str(p / "nope.jsonl")}), "dpo", "preference"),
     r"reference.cache: reference cache '.*nope.jsonl' does not exist"),
    # keys and sections that the chosen algorithm would not read
    (bad(lambda c, p: c.update(algorithm={"name": "dpkd", "on_policy": 0.5}), "dpkd", "preference"),
     r"algorithm.on_policy \(algorithm 'dpkd'\): unknown parameter 'on_policy'. Valid parameters: online, "
     r"max_new_tokens, temperature"),
    (bad(lambda c, p: None, "dpo", "preference"),
     r"teacher: algorithm 'preference' does not use a teacher; remove the section \(nothing would read it\)"),
    (bad(lambda c, p: c.update(reference={"tiny": STUDENT}), "fkl", "chat"),
     r"reference: algorithm 'distill' does not use a reference"),
])
def test_bad_algorithm_configs_fail_before_any_model_loads(tmp_path, no_models, register_plugin, make, message):
    register_plugin(CallbackPlugin(), "recorder-plugin")
    raw = make(tmp_path)
    path = tmp_path / "bad.yaml"
    path.write_text(json.dumps(raw))
    with pytest.raises(dz.ConfigError, match=message):
        train(dz.load_config(path), where=str(path))


def test_an_unknown_algorithm_names_its_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("objective: {name: dpo}\nalgorithm:\n  name: prefrence\n")
    with pytest.raises(dz.ConfigError, match=rf"^{path}:3: algorithm.name: unknown algorithm 'prefrence'"):
        dz.load_config(path)


def test_the_builtin_algorithms_are_plugins_listed_by_the_cli(capsys):
    from distillzoo.cli import main

    assert main(["algorithms"]) == 0
    rows = {line.split()[0]: line.split()[1:3] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {"distill": ["distillzoo", "instruction"], "dpkd": ["distillzoo", "preference"],
                    "preference": ["distillzoo", "preference"]}
    assert main(["algorithms", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert entries["dpkd"]["params"]["online"] == {"type": "bool", "default": False,
                                                   "doc": entries["dpkd"]["params"]["online"]["doc"]}
    assert entries["dpkd"]["paper"]["url"] == "https://arxiv.org/abs/2406.19774"
