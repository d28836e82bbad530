"""The catalogue and the plugin rules: sync with registry.yaml, validation, clashes, hooks."""

import inspect
import json
import warnings
from pathlib import Path

import pytest
import yaml

import distillzoo as dz
from distillzoo.hooks import hookspecs
from distillzoo.objectives.logit import LogitObjective
from distillzoo.objectives.preference import PreferenceObjective
from distillzoo.hooks.catalogue import load_registry_yaml

ROOT = Path(__file__).resolve().parents[1]


def builtin_specs():
    return {n: s for n, s in dz.objective_specs().items() if s.package == "distillzoo"}


def test_registry_yaml_and_builtin_registrations_agree_both_ways():
    entries = yaml.safe_load((ROOT / "registry.yaml").read_text())["objectives"]
    assert set(entries) == set(builtin_specs())
    assert all(entry["package"] == "distillzoo" for entry in entries.values())


def test_packaged_registry_is_the_root_file():
    assert load_registry_yaml() == yaml.safe_load((ROOT / "registry.yaml").read_text())


@pytest.mark.parametrize("name", sorted(load_registry_yaml()["objectives"]))
def test_constructor_defaults_match_the_catalogue(name):
    spec = dz.objective_spec(name)
    own = {p.name: p.default for p in inspect.signature(spec.cls.__init__).parameters.values()
           if p.kind is p.KEYWORD_ONLY}
    base = LogitObjective if spec.kind == "logit" else PreferenceObjective
    shared = {p.name: p.default for p in inspect.signature(base.__init__).parameters.values()
              if p.kind is p.KEYWORD_ONLY}
    assert {**own, **shared} == {n: p.default for n, p in spec.params.items()}


def test_list_objectives_and_build_by_name():
    assert {"fkl", "rkl"} <= set(dz.list_objectives())
    loss_fn = dz.objective("rkl", temperature=3, reduction="sum")
    assert type(loss_fn).__name__ == "ReverseKL"
    assert loss_fn.temperature == 3.0 and isinstance(loss_fn.temperature, float) and loss_fn.reduction == "sum"


def test_unknown_objective_lists_names_and_suggests():
    with pytest.raises(dz.UnknownNameError) as err:
        dz.objective("fkll")
    assert str(err.value) == "unknown objective 'fkll'. Available: abkd, akl, ce, dpkd, dpkd_token, dpo, fkl, jsd, rkl, simpo, skl, srkl, taid, tvd. Did you mean 'fkl'?"


def test_unknown_parameter_lists_valid_ones_and_suggests():
    with pytest.raises(dz.UnknownNameError, match=r"objective 'fkl': unknown parameter 'temprature'\. Valid parameters: "
                       r"temperature, scale_by_temperature_squared, ignore_index, reduction, vocab_size\. "
                       r"Did you mean 'temperature'\?"):
        dz.objective("fkl", temprature=2.0)


@pytest.mark.parametrize("params, message", [
    ({"temperature": 0.0}, r"objective 'fkl': parameter 'temperature' = 0.0 is out of range \(0, inf\)"),
    ({"temperature": -1}, r"parameter 'temperature' = -1.0 is out of range \(0, inf\)"),
    ({"temperature": "hot"}, r"parameter 'temperature' must be a float, got str 'hot'"),
    ({"temperature": True}, r"parameter 'temperature' must be a float, got bool True"),
    ({"reduction": "avg"}, r"parameter 'reduction' = 'avg' is not one of \['mean', 'sum', 'none'\]"),
    ({"vocab_size": 0}, r"parameter 'vocab_size' = 0 is out of range \[1, inf\)"),
    ({"ignore_index": 1.5}, r"parameter 'ignore_index' must be an int, got float 1.5"),
])
def test_invalid_parameter_values_are_refused(params, message):
    with pytest.raises(dz.ParameterError, match=message):
        dz.objective("fkl", **params)


def test_nullable_parameter_accepts_null():
    assert dz.objective("fkl", vocab_size=None).vocab_size is None
    assert dz.objective("fkl", vocab_size=1000).vocab_size == 1000


class Hellinger(LogitObjective):
    """Squared Hellinger distance, used as a throwaway third-party objective."""

    name = "hellinger"

    def token_loss(self, student_logprobs, teacher_logprobs, labels):
        return 1 - (0.5 * (student_logprobs + teacher_logprobs)).exp().sum(-1)


HELLINGER_ENTRY = {
    "kind": "logit",
    "summary": "squared Hellinger distance",
    "formula": "1 - sum_v sqrt(p_v q_v)",
    "params": {},
    "inputs": ["student_logits", "teacher_logits", "labels"],
    "paper": {"title": "Neue Begruendung der Theorie quadratischer Formen", "year": 1909},
}


class ThirdParty:
    def __init__(self, cls, entry):
        self.cls, self.entry = cls, entry

    @dz.hookimpl
    def register_objectives(self, register):
        register(self.cls, entry=self.entry)


def test_hook_register_objectives_third_party_with_its_own_entry(register_plugin):
    register_plugin(ThirdParty(Hellinger, HELLINGER_ENTRY), "hellinger-plugin")
    assert "hellinger" in dz.list_objectives()
    spec = dz.objective_spec("hellinger")
    assert spec.package == "hellinger-plugin" and spec.summary == "squared Hellinger distance"
    assert set(spec.params) == {"temperature", "scale_by_temperature_squared", "ignore_index", "reduction", "vocab_size"}
    # p = (1/2, 1/2), q = (1/4, 3/4): 1 - sqrt(1/8) - sqrt(3/8)
    import math

    import torch
    teacher = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    student = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    value = dz.objective("hellinger")(student, teacher, torch.tensor([0])).item()
    assert value == pytest.approx(1 - math.sqrt(1 / 8) - math.sqrt(3 / 8), rel=1e-12)


def test_duplicate_objective_name_names_both_packages(register_plugin):
    class FakeFKL(Hellinger):
        name = "fkl"

    register_plugin(ThirdParty(FakeFKL, HELLINGER_ENTRY), "copycat-kd")
    with pytest.raises(dz.PluginError, match="objective 'fkl' is registered twice: by package 'distillzoo' and by package 'copycat-kd'"):
        dz.list_objectives()


def isolated(match):
    """A broken third-party hook is skipped with one PluginWarning naming it (the others load)."""
    return pytest.warns(dz.PluginWarning, match=match)


def test_third_party_objective_without_entry_is_isolated(register_plugin):
    register_plugin(ThirdParty(Hellinger, None), "lazy-plugin")
    with isolated(r"plugin 'lazy-plugin' from package 'lazy-plugin' failed in register_objectives and its objectives "
                  r"were skipped: PluginError: objective 'hellinger' from package 'lazy-plugin' has no catalogue entry"):
        names = dz.list_objectives()
    assert "hellinger" not in names and {"fkl", "rkl", "dpo"} <= set(names)


@pytest.mark.parametrize("broken, message", [
    ({k: v for k, v in HELLINGER_ENTRY.items() if k != "formula"}, r"missing field\(s\) \['formula'\]"),
    ({**HELLINGER_ENTRY, "kind": "token"}, r"kind 'token' is not one of \['logit', 'preference'\]"),
    ({**HELLINGER_ENTRY, "params": {"temperature": {"type": "float", "default": 2.0}}},
     r"parameter\(s\) \['temperature'\] are shared by every logit objective"),
    ({**HELLINGER_ENTRY, "params": {"alpha": {"type": "float", "default": 2.0, "range": "(0, 1)"}}},
     r"the default of parameter 'alpha' is invalid"),
    ({**HELLINGER_ENTRY, "params": {"alpha": {"type": "real", "default": 0.5}}}, r"parameter 'alpha' has type 'real'"),
])
def test_malformed_third_party_entry_names_the_package(register_plugin, broken, message):
    register_plugin(ThirdParty(Hellinger, broken), "sloppy-plugin")
    with isolated(r"catalogue entry for objective 'hellinger' \(package 'sloppy-plugin'\): " + message):
        assert "hellinger" not in dz.list_objectives()
    with pytest.raises(dz.UnknownNameError, match="unknown objective 'hellinger'"):
        dz.objective("hellinger")


def test_registering_a_non_objective_is_isolated(register_plugin):
    register_plugin(ThirdParty(dict, HELLINGER_ENTRY), "confused-plugin")
    with isolated("plugin 'confused-plugin' .* registered <class 'dict'>, which is not a distillzoo.Objective subclass"):
        assert "fkl" in dz.list_objectives()


class HalfBroken:
    """Registers one good objective, then raises: nothing it registered may be kept."""

    @dz.hookimpl
    def register_objectives(self, register):
        register(Hellinger, entry=HELLINGER_ENTRY)
        raise RuntimeError("the plugin's own bug")


def test_a_hook_that_raises_is_isolated_all_or_nothing(register_plugin):
    register_plugin(HalfBroken(), "half-broken")
    register_plugin(ThirdParty(type("Bhatta", (Hellinger,), {"name": "bhatta"}), HELLINGER_ENTRY), "good-plugin")
    with isolated(r"plugin 'half-broken' from package 'half-broken' failed in register_objectives and its objectives "
                  r"were skipped: RuntimeError: the plugin's own bug") as record:
        names = dz.list_objectives()
    assert "hellinger" not in names and "bhatta" in names  # the good plugin still loads
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per manager: the next lookups are quiet
        dz.objective_spec("bhatta")


def test_plugins_command_lists_problems_instead_of_failing(register_plugin, capsys):
    from distillzoo.cli import main

    class FakeFKL(Hellinger):
        name = "fkl"

    register_plugin(HalfBroken(), "half-broken")
    register_plugin(ThirdParty(FakeFKL, HELLINGER_ENTRY), "copycat-kd")
    register_plugin(ComponentPlugin(), "components-plugin")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # diagnostics report; they do not warn or raise
        assert main(["plugins"]) in (0, None)
    info = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert info["half-broken"]["objectives"] == [] and info["half-broken"]["problems"] == [
        {"package": "half-broken", "hook": "register_objectives", "error": "RuntimeError: the plugin's own bug"}]
    (clash,) = info["copycat-kd"]["problems"]
    assert "objective 'fkl' is registered twice: by package 'distillzoo' and by package 'copycat-kd'" in clash["error"]
    assert info["components-plugin"]["problems"] == [] and info["components-plugin"]["scorers"] == ["length"]
    assert info["distillzoo.plugins.objectives.divergences"]["objectives"] == ["abkd", "akl", "fkl", "jsd", "rkl", "skl", "srkl", "taid", "tvd"]
    with isolated("half-broken"), pytest.raises(dz.PluginError, match="objective 'fkl' is registered twice"):
        dz.objective("fkl")  # using a clashing name stays an error


class BadComponents:
    @dz.hookimpl
    def register_data_formats(self, register):
        register("qa", lambda record: record, records="pairs")

    @dz.hookimpl
    def register_scorers(self, register):
        register("length", "not a function")


def test_invalid_components_are_isolated(register_plugin):
    register_plugin(BadComponents(), "bad-components")
    with isolated(r"data format 'qa' \(package 'bad-components'\) registered records='pairs'; expected one of "
                  r"\['instruction', 'preference'\]"):
        formats = dz.components("data_formats")
    assert "qa" not in formats and {"alpaca", "chat", "preference"} <= set(formats)
    with isolated(r"scorer 'length' \(package 'bad-components'\) registered 'not a function', which is not callable"):
        assert "length" not in dz.components("scorers")


class ComponentPlugin:
    """Registers one data format, one scorer and one trainer callback."""

    @dz.hookimpl
    def register_data_formats(self, register):
        register("tsv", lambda record: {"prompt": record["q"], "response": record["a"]}, summary="q/a pairs")

    @dz.hookimpl
    def register_scorers(self, register):
        register("length", lambda sample: float(len(sample["response"])), summary="response length")

    @dz.hookimpl
    def register_trainer_callbacks(self, register):
        register("print-loss", lambda: print, summary="prints the loss")


@pytest.mark.parametrize("kind, name", [("data_formats", "tsv"), ("scorers", "length"), ("trainer_callbacks", "print-loss")])
def test_component_hooks_collect_by_name_with_package(register_plugin, kind, name):
    register_plugin(ComponentPlugin(), "components-plugin")
    found = dz.components(kind)
    assert found[name].package == "components-plugin"
    assert found[name].summary


def test_hook_register_data_formats(register_plugin):
    register_plugin(ComponentPlugin(), "components-plugin")
    reader = dz.components("data_formats")["tsv"].obj
    assert reader({"q": "2+2", "a": "4"}) == {"prompt": "2+2", "response": "4"}


def test_hook_register_scorers(register_plugin):
    register_plugin(ComponentPlugin(), "components-plugin")
    assert dz.components("scorers")["length"].obj({"response": "abcd"}) == 4.0


def test_hook_register_curation_stages(register_plugin):
    from distillzoo.curate.pipeline import Row, Stage

    class Shortest(Stage):
        def __init__(self, min_chars: int = 3):
            self.min_chars = min_chars

        def judge(self, row):
            return ("short", {}) if len(row.fields["messages"][-1]["content"]) < self.min_chars else None

    class StagePlugin:
        @dz.hookimpl
        def register_curation_stages(self, register):
            register("shortest", Shortest, summary="drops short replies")

    register_plugin(StagePlugin(), "stage-plugin")
    stage = dz.components("curation_stages")["shortest"].obj(min_chars=4)
    row = Row("f:1", {}, {"id": "a", "messages": [{"role": "user", "content": "q"},
                                                  {"role": "assistant", "content": "abc"}]})
    assert stage.judge(row) == ("short", {}) and "dedup" in dz.components("curation_stages")


def test_hook_register_taggers(register_plugin, tmp_path):
    from distillzoo.curate.pipeline import Tagger, curate

    class FirstWord(Tagger):
        """Stands in for a trained classifier: the label is the instruction's first word, when it names a type."""

        def begin(self, context, types):
            self.names = {t["name"] for t in types}

        def tag(self, rows):
            first = [row.fields["messages"][0]["content"].split()[0] for row in rows]
            return [(w if w in self.names else "other", {}) for w in first]

    class TaggerPlugin:
        @dz.hookimpl
        def register_taggers(self, register):
            register("first-word", FirstWord, summary="the first word as the label")

    register_plugin(TaggerPlugin(), "tagger-plugin")
    assert set(dz.components("taggers")) == {"first-word", "keywords", "model"}
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": q},
                                                              {"role": "assistant", "content": "a"}]}) + "\n"
                            for i, q in enumerate(["math: 1+1", "math now", "写诗"])), encoding="utf-8")
    curate({"data": str(data), "format": "chat", "out": str(tmp_path / "out"), "malformed": "refuse",
            "shard_size": 10, "stages": [{"name": "tag", "tagger": "first-word"}]}, say=lambda _: None)
    tags = [json.loads(line)["task"] for line in (tmp_path / "out" / "curated.jsonl").read_text().splitlines()]
    assert tags == ["other", "math", "other"]


def test_hook_register_trainer_callbacks(register_plugin):
    register_plugin(ComponentPlugin(), "components-plugin")
    assert dz.components("trainer_callbacks")["print-loss"].obj() is print


def test_duplicate_component_names_both_packages(register_plugin):
    register_plugin(ComponentPlugin(), "first-plugin")
    register_plugin(ComponentPlugin(), "second-plugin")
    with pytest.raises(dz.PluginError, match="scorer 'length' is registered twice: by package 'first-plugin' and by package 'second-plugin'"):
        dz.components("scorers")


def test_plugins_info_reports_hooks_and_names(register_plugin):
    register_plugin(ComponentPlugin(), "components-plugin")
    info = {p["name"]: p for p in dz.plugins_info()}
    builtin = info["distillzoo.plugins.objectives.divergences"]
    assert builtin["package"] == "distillzoo" and builtin["objectives"] == ["abkd", "akl", "fkl", "jsd", "rkl", "skl", "srkl", "taid", "tvd"]
    assert builtin["hooks"] == ["register_objectives"]
    mine = info["components-plugin"]
    assert mine["hooks"] == ["register_data_formats", "register_scorers", "register_trainer_callbacks"]
    assert mine["algorithms"] == []
    assert (mine["data_formats"], mine["scorers"], mine["trainer_callbacks"]) == (["tsv"], ["length"], ["print-loss"])


class NoisyDistill(dz.Algorithm):
    """A throwaway third-party algorithm (never run here: registration and lookup only)."""

    name = "noisy"
    summary = "a throwaway algorithm"
    params = {"sigma": {"type": "float", "default": 0.1, "range": "[0, inf)"}}


class AlgorithmPlugin:
    def __init__(self, cls=NoisyDistill):
        self.cls = cls

    @dz.hookimpl
    def register_algorithms(self, register):
        register(self.cls)


def test_hook_register_algorithms(register_plugin):
    register_plugin(AlgorithmPlugin(), "noisy-plugin")
    spec = dz.algorithm_spec("noisy")
    assert spec.package == "noisy-plugin" and spec.cls is NoisyDistill
    assert spec.validate_params({"sigma": 2}) == {"sigma": 2.0}
    with pytest.raises(dz.ParameterError, match=r"algorithm 'noisy': parameter 'sigma' = -1.0 is out of range"):
        spec.validate_params({"sigma": -1.0})
    info = {p["name"]: p for p in dz.plugins_info()}
    assert info["noisy-plugin"]["algorithms"] == ["noisy"] and info["noisy-plugin"]["hooks"] == ["register_algorithms"]
    assert [info[f"distillzoo.plugins.algorithms.{name}"]["algorithms"] for name in ("distill", "preference", "dpkd")] \
        == [["distill"], ["preference"], ["dpkd"]]


def test_duplicate_algorithm_name_names_both_packages(register_plugin):
    class FakeDistill(NoisyDistill):
        name = "distill"

    register_plugin(AlgorithmPlugin(FakeDistill), "copycat-algorithms")
    with pytest.raises(dz.PluginError, match="algorithm 'distill' is registered twice: by package 'distillzoo' and by "
                                             "package 'copycat-algorithms'"):
        dz.algorithm_specs()


def test_an_algorithm_param_may_not_hide_a_method(register_plugin):
    class Shadowing(NoisyDistill):
        name = "shadowing"
        params = {"loss": {"type": "float", "default": 1.0}}

    register_plugin(AlgorithmPlugin(Shadowing), "shadow-plugin")
    with isolated(r"algorithm 'shadowing' \(package 'shadow-plugin'\): parameter\(s\) "
                  r"\['loss'\] would hide the algorithm's methods"):
        assert "shadowing" not in dz.algorithm_specs()


def test_registering_a_non_algorithm_is_isolated(register_plugin):
    register_plugin(AlgorithmPlugin(dict), "confused-algorithms")
    with isolated("registered <class 'dict'> as an algorithm; it must be a distillzoo.Algorithm subclass"):
        assert set(dz.algorithm_specs()) >= {"distill", "preference", "dpkd"}


def test_every_hook_has_a_test_and_a_docs_section():
    hooks = [n for n in dir(hookspecs) if n.startswith("register_")]
    assert len(hooks) == 7
    this_file = Path(__file__).read_text()
    plugins_page = (ROOT / "docs" / "plugins.md").read_text()
    for hook in hooks:
        assert f"def test_hook_{hook}" in this_file, f"hook {hook} has no test_hook_{hook}"
        assert f"| `{hook}` |" in plugins_page, f"hook {hook} has no row in docs/plugins.md's table of hooks"
        assert getattr(hookspecs, hook).__doc__, f"hook {hook} has no docstring"
