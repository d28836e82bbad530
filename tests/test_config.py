"""Config by name: struct mode, overrides, weighted lists, and errors that say where."""

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import distillzoo as dz
from distillzoo.hooks.catalogue import load_registry_yaml

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_single_objective_with_params_and_override(tmp_path):
    path = write(tmp_path, "objective:\n  name: fkl\n  temperature: 2.0\nseed: 3\n")
    cfg = dz.load_config(path, ["objective.temperature=4", "seed=5"])
    loss_fn = dz.build_objective(cfg)
    assert type(loss_fn).__name__ == "ForwardKL" and loss_fn.temperature == 4.0 and cfg.seed == 5
    assert OmegaConf.is_struct(cfg)


def test_weighted_list_builds_the_weighted_sum(tmp_path):
    path = write(tmp_path, "objectives:\n  - {name: fkl, weight: 0.25, temperature: 2.0}\n  - {name: rkl, weight: 0.75}\n")
    mix = dz.build_objective(dz.load_config(path))
    student, teacher = torch.randn(7, 20), torch.randn(7, 20)
    labels = torch.arange(7)
    expected = 0.25 * dz.objective("fkl", temperature=2.0)(student, teacher, labels) + 0.75 * dz.objective("rkl")(student, teacher, labels)
    torch.testing.assert_close(mix(student, teacher, labels), expected)


def test_ce_plus_fkl_mixture_by_config_reports_each_term(tmp_path):
    path = write(tmp_path, "objectives:\n  - {name: ce, weight: 0.5, label_smoothing: 0.1}\n  - {name: fkl, weight: 0.5}\n")
    mix = dz.build_objective(dz.load_config(path))
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, 30, generator=g, dtype=torch.float64), torch.randn(8, 30, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 30, (8,), generator=g)
    labels[2] = -100
    ce = torch.nn.functional.cross_entropy(student, labels, label_smoothing=0.1)
    valid = labels != -100
    p, log_q = torch.softmax(teacher[valid], -1), torch.log_softmax(student[valid], -1)
    fkl = (p * (p.log() - log_q)).sum(-1).mean()
    torch.testing.assert_close(mix(student, teacher, labels), 0.5 * ce + 0.5 * fkl)
    torch.testing.assert_close(mix.term_losses["ce"], ce)
    torch.testing.assert_close(mix.term_losses["fkl"], fkl)


def test_unknown_top_level_key_names_file_line_and_suggests(tmp_path):
    path = write(tmp_path, "objective: {name: fkl}\nsede: 3\n")
    with pytest.raises(dz.ConfigError) as err:
        dz.load_config(path)
    assert str(err.value) == f"{path}:2: unknown config key 'sede'. Valid keys: objective, objectives, algorithm, seed, student, teacher, teachers, reference, callbacks, data, train, output_dir, resume, generate, score, curate. Did you mean 'seed'?"


def test_unknown_key_in_an_override_names_the_override(tmp_path):
    path = write(tmp_path, "objective: {name: fkl}\n")
    with pytest.raises(dz.ConfigError, match=r"override 'seeds=1': unknown config key 'seeds'\. .* Did you mean 'seed'\?"):
        dz.load_config(path, ["seeds=1"])


def test_unknown_objective_name_in_a_list_names_the_path(tmp_path):
    path = write(tmp_path, "objectives:\n  - name: fkl\n    weight: 0.5\n  - name: rlk\n    weight: 0.5\n")
    with pytest.raises(dz.ConfigError) as err:
        dz.load_config(path)
    assert str(err.value) == (
        f"{path}:4: objectives[1].name: unknown objective 'rlk'. Available: abkd, akl, ce, dpkd, dpkd_token, dpo, fkl, jsd, rkl, simpo, skl, srkl, taid, tvd. Did you mean 'rkl'?"
    )


def test_unknown_objective_parameter_names_file_line(tmp_path):
    path = write(tmp_path, "objective:\n  name: fkl\n  temprature: 2.0\n")
    with pytest.raises(dz.ConfigError, match=rf"^{path}:3: objective.temprature \(objective 'fkl'\): unknown parameter "
                       r"'temprature'\. Valid parameters: .*Did you mean 'temperature'\?$"):
        dz.load_config(path)


def test_out_of_range_value_from_override(tmp_path):
    path = write(tmp_path, "objective:\n  name: rkl\n")
    with pytest.raises(dz.ConfigError, match=r"override 'objective.temperature=-2': objective.temperature \(objective 'rkl'\): "
                       r"parameter 'temperature' = -2.0 is out of range \(0, inf\)"):
        dz.load_config(path, ["objective.temperature=-2"])


@pytest.mark.parametrize("text, message", [
    ("seed: 1\n", r"no objective selected: add `objective: \{name: fkl\}` or a weighted `objectives:` list\. Available: abkd, akl, ce, dpkd, dpkd_token, dpo, fkl, jsd, rkl, simpo, skl, srkl, taid, tvd"),
    ("objective: {name: fkl}\nobjectives: [{name: rkl}]\n", r":2: give either 'objective' or 'objectives', not both"),
    ("objective: {temperature: 2}\n", r":1: objective has no 'name'\. Available: abkd, akl, ce, dpkd, dpkd_token, dpo, fkl, jsd, rkl, simpo, skl, srkl, taid, tvd"),
    ("objective: {name: fkl, weight: 0.5}\n", r":1: a single 'objective' takes no weight; use 'objectives:' to mix"),
    ("objectives: []\n", r":1: 'objectives' must be a non-empty list"),
    ("objectives: [{name: fkl, weight: heavy}]\n", r":1: objectives\[0\]\.weight must be a number, got 'heavy'"),
    ("objective: [fkl\n", r":2: not valid YAML"),
    ("- fkl\n", r"the top level must be a mapping of keys, got list"),
    ("seed: many\nobjective: {name: fkl}\n", r":1: seed: Value 'many' of type 'str' could not be converted to Integer$"),
])
def test_malformed_configs_say_what_and_where(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(dz.ConfigError, match=message):
        dz.load_config(path)


def test_bad_override_value_names_the_override(tmp_path):
    path = write(tmp_path, "objective: {name: fkl}\n")
    with pytest.raises(dz.ConfigError, match=r"^override 'seed=x': seed: Value 'x' of type 'str' could not be converted to Integer$"):
        dz.load_config(path, ["seed=x"])


def test_missing_file_and_bad_override_form(tmp_path):
    with pytest.raises(dz.ConfigError, match="config file .*nope.yaml' does not exist"):
        dz.load_config(tmp_path / "nope.yaml")
    path = write(tmp_path, "objective: {name: fkl}\n")
    with pytest.raises(dz.ConfigError, match="override 'seed' is not of the form key=value"):
        dz.load_config(path, ["seed"])


def test_mixture_terms_that_disagree_are_a_config_error(tmp_path):
    path = write(tmp_path, "objectives:\n  - {name: fkl, reduction: sum}\n  - {name: rkl}\n")
    with pytest.raises(dz.ConfigError, match="objectives: Mixture terms disagree on reduction"):
        dz.build_objective(dz.load_config(path))


@pytest.mark.parametrize("name", sorted(load_registry_yaml()["objectives"]))
def test_starter_config_round_trips_to_the_same_objective(tmp_path, name):
    path = write(tmp_path, dz.starter_config(name))
    loss_fn = dz.build_objective(dz.load_config(path))
    spec = dz.objective_spec(name)
    assert type(loss_fn) is spec.cls
    for pname, p in spec.params.items():
        assert getattr(loss_fn, pname) == p.default


@pytest.mark.parametrize("name", sorted(load_registry_yaml()["objectives"]))
def test_the_starter_config_is_complete_for_train_before_any_model(tmp_path, name, monkeypatch, no_models):
    from distillzoo.training.spec import resolve

    monkeypatch.chdir(ROOT)  # its data paths are the repository's quickstart files
    cfg = dz.load_config(write(tmp_path, dz.starter_config(name)), [f"output_dir={tmp_path / 'run'}"])
    run = resolve(cfg, where="starter")  # what train checks before it loads a model
    spec = dz.objective_spec(name)
    assert type(run.algorithm).name == spec.cls.default_algorithm
    assert (cfg.teacher is not None) == ("teacher" in run.algorithm.reads(run))


@pytest.mark.parametrize("name", ["fkl", "dpo", "dpkd"])  # one per built-in algorithm
def test_the_starter_config_trains_as_printed(tmp_path, name, monkeypatch):
    from distillzoo import train

    monkeypatch.chdir(ROOT)
    cfg = dz.load_config(write(tmp_path, dz.starter_config(name)),  # shortened: two steps, no held-out pass
                         [f"output_dir={tmp_path / 'run'}", "train.steps=2", "data.eval=null", "train.progress=false"])
    result = train(cfg, where="starter")
    assert result.steps == 2 and math.isfinite(result.final_loss)
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_overrides_reach_into_list_items_and_name_the_override_when_wrong():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cfg = dz.load_config(root / "configs" / "quickstart.yaml", ["data.streams.0.path=other.jsonl",
                                                             "data.streams[0].repeat=3"])
    assert cfg.data.streams[0].path == "other.jsonl" and cfg.data.streams[0].repeat == 3.0
    from omegaconf import OmegaConf

    written = OmegaConf.load(root / "configs" / "quickstart.yaml").data.streams[0]
    assert cfg.data.streams[0].name == written.name and written.path != "other.jsonl"  # the rest of the item is kept
    with pytest.raises(dz.ConfigError, match=r"override 'data.streams\[0\].pathz=1': .*Key 'pathz' not in 'StreamConfig'"):
        dz.load_config(root / "configs" / "quickstart.yaml", ["data.streams[0].pathz=1"])


def test_teacher_only_keys_on_the_student_or_reference_are_refused_where_given(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("objective: {name: fkl}\nstudent:\n  tiny: {hidden_size: 32}\n  prefetch: 2\n")
    with pytest.raises(dz.ConfigError, match=r"c.yaml:4: student.prefetch: only the teacher's section is read for "
                                             r"prefetch \(teacher.prefetch\)"):
        dz.load_config(cfg)
    cfg.write_text("objective: {name: fkl}\nstudent: {tiny: {hidden_size: 32}}\n")
    with pytest.raises(dz.ConfigError, match=r"override 'reference.api=sglang': reference.api: only the teacher's"):
        dz.load_config(cfg, ["reference.api=sglang"])
    assert dz.load_config(cfg, ["teacher.prefetch=0", "teacher.api=sglang"]).teacher.prefetch == 0
