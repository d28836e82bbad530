"""The example plugin package, installed into a throwaway directory, is found through its entry point."""

import json
import math
from pathlib import Path

import pytest

import distillzoo as dz

from helpers import install_into, run_installed

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "distillzoo-renyi"


run = run_installed


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    return install_into(tmp_path_factory.mktemp("site"), EXAMPLE)


@pytest.mark.slow
def test_listed_with_its_package(installed, tmp_path):
    out = run(["-m", "distillzoo", "list"], tmp_path, installed)
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines()[1:]}
    assert rows["renyi"] == ["logit", "distillzoo-renyi"]
    assert rows["fkl"] == ["logit", "distillzoo"]


@pytest.mark.slow
def test_usable_by_name_with_validated_params(installed, tmp_path):
    probe = (
        "import torch, distillzoo as dz\n"
        "t = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))\n"
        "s = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))\n"
        "print(dz.objective('renyi', alpha=0.5)(s, t, torch.tensor([0])).item())\n"
        "print(dz.objective_spec('renyi').package)\n"
        "try:\n    dz.objective('renyi', alpha=1.5)\nexcept dz.ParameterError as e:\n    print(e)\n"
    )
    value, package, error = run(["-c", probe], tmp_path, installed).splitlines()
    assert float(value) == pytest.approx(-2 * math.log(math.sqrt(1 / 8) + math.sqrt(3 / 8)), rel=1e-12)
    assert package == "distillzoo-renyi"
    assert error == "objective 'renyi': parameter 'alpha' = 1.5 is out of range (0, 1)"


@pytest.mark.slow
def test_its_own_conformance_tests_pass(installed, tmp_path):
    out = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(EXAMPLE),
               "-c", str(EXAMPLE / "pyproject.toml"), str(EXAMPLE / "tests")], tmp_path, installed)
    assert "11 passed" in out


@pytest.mark.slow
def test_its_scorer_is_chosen_by_name_like_the_built_ins(installed, tmp_path):
    """The package also registers a data-selection scorer; distillzoo score uses it from outside."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import json, sys, torch\n"
        "from distillzoo.hooks.manager import components\n"
        "from distillzoo.models.causal_lm import tiny_qwen2\n"
        "from distillzoo.teacher.scoring import make_scorer, score_samples\n"
        "from distillzoo.data.shards import ConversationDataset\n"
        "from distillzoo.data.tokenizer import load_tokenizer\n"
        "tok = load_tokenizer()\n"
        "teacher = tiny_qwen2(hidden_size=48, num_layers=1, seed=1).eval()\n"
        "student = tiny_qwen2(hidden_size=32, num_layers=1, seed=2).eval()\n"
        "with torch.no_grad():\n"
        "    teacher.lm_head.weight.mul_(20)\n"
        "data = sys.argv[1]\n"
        "got = score_samples(make_scorer({'name': 'renyi_gap', 'alpha': 0.5}), data, 'chat', tok, teacher=teacher,\n"
        "                    student=student, system=None)\n"
        "want = {}\n"
        "for item in ConversationDataset(data, 'chat', tok, system=None):\n"
        "    ids, mask = item['input_ids'].long()[None], item['loss_mask'][1:]\n"
        "    with torch.no_grad():\n"
        "        lp = torch.log_softmax(teacher(input_ids=ids).logits[0, :-1].double(), -1)[mask]\n"
        "        lq = torch.log_softmax(student(input_ids=ids).logits[0, :-1].double(), -1)[mask]\n"
        "    want[item['id']] = float((torch.logsumexp(0.5 * lp + 0.5 * lq, -1) / (0.5 - 1)).mean())\n"
        "print(components('scorers')['renyi_gap'].package)\n"
        "print(json.dumps([got, want]))\n")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i}", "messages": [
        {"role": "user", "content": f"{i} + {i} = ?"}, {"role": "assistant", "content": str(2 * i)}]}) + "\n"
        for i in range(4)))
    package, values = run([str(probe), str(data)], tmp_path, installed).splitlines()
    got, want = json.loads(values)
    assert package == "distillzoo-renyi"
    assert got.keys() == want.keys() and len(got) == 4
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4)


@pytest.mark.slow
def test_a_comparison_names_it_like_a_built_in_and_tunes_its_learning_rate(installed, tmp_path):
    import yaml

    from helpers import write_jsonl

    chat = lambda lo, n: [{"id": f"q{a}", "messages": [{"role": "user", "content": f"{a} + 1 = ?"},  # noqa: E731
                                                       {"role": "assistant", "content": str(a + 1)}]}
                          for a in range(lo, lo + n)]
    files = {name: str(write_jsonl(tmp_path / f"{name}.jsonl", chat(lo, n)))
             for name, lo, n in (("train", 0, 8), ("val", 30, 4), ("held", 20, 4))}
    config = tmp_path / "compare.yaml"
    config.write_text(yaml.safe_dump({
        "base": {"student": {"tiny": {"hidden_size": 32, "num_layers": 1}},
                 "teacher": {"tiny": {"hidden_size": 48, "num_layers": 1, "seed": 7}},
                 "data": {"streams": [{"name": "s", "path": files["train"], "format": "chat", "repeat": 1}],
                          "system": None},
                 "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "log_every": 1}},
        "held_out": {"path": files["held"], "format": "chat"}, "validation": {"path": files["val"], "format": "chat"},
        "entrants": [{"name": "renyi", "objective": {"name": "renyi", "alpha": 0.5}, "lr": [1e-4, 3e-3]},
                     {"name": "fkl", "objective": {"name": "fkl"}}],
        "seeds": [0], "output_dir": str(tmp_path / "cmp")}))
    out = run(["-m", "distillzoo", "compare", str(config)], tmp_path, installed)
    assert "| renyi |" in out and "| fkl |" in out  # the report, printed
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    renyi = [r for r in results["runs"] if r["entrant"] == "renyi"]
    assert sorted(r["lr"] for r in renyi) == [1e-4, 3e-3]
    best = min(renyi, key=lambda r: r["validation/nll"])  # tuned on validation ...
    assert results["chosen_lr"]["renyi"] == best["lr"] and not best["tuning"] and "held_out/nll" in best
    assert [r for r in renyi if r["tuning"]][0].get("held_out/nll") is None  # ... reported on held-out only


@pytest.mark.slow
def test_the_default_comparison_resolves_every_entrant_with_the_plugin_installed(installed, tmp_path):
    """configs/compare_quickstart.yaml names the plugin's renyi beside the built-ins; with the package installed
    every entrant's train config resolves as train would check it (no model is loaded)."""
    import yaml

    from distillzoo.compare.plan import load_plan
    from distillzoo.models.causal_lm import tiny_qwen2

    raw = yaml.safe_load((ROOT / "configs/compare_quickstart.yaml").read_text(encoding="utf-8"))
    tiny_qwen2(hidden_size=32, num_layers=1, tie_word_embeddings=True).save_pretrained(tmp_path / "teacher")
    raw["base"]["teacher"]["path"] = str(tmp_path / "teacher")
    raw["output_dir"] = str(tmp_path / "compare")
    (tmp_path / "compare.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    probe = ("import os, sys\nos.chdir(sys.argv[2])\nfrom distillzoo.compare.plan import load_plan\n"
             "plan = load_plan(sys.argv[1])\n"
             "print(([(e.name, [o['name'] for o in e.terms.get('objectives') or [e.terms['objective']]]) "
             "for e in plan.entrants], plan.seeds))\n")
    (tmp_path / "probe.py").write_text(probe, encoding="utf-8")
    out = run([str(tmp_path / "probe.py"), str(tmp_path / "compare.yaml"), str(ROOT)], tmp_path, installed)
    assert out.strip() == str(([("ce", ["ce"]), ("fkl", ["fkl"]), ("rkl", ["rkl"]), ("jsd", ["jsd"]),
                                ("skl", ["skl"]), ("ce+fkl", ["ce", "fkl"]), ("renyi", ["renyi"])], [0, 1, 2]))
    with pytest.raises(dz.ConfigError) as refused:  # without the package, the entrant is refused by name
        load_plan(tmp_path / "compare.yaml")
    assert "entrant 'renyi'" in str(refused.value) and "unknown objective 'renyi'" in str(refused.value)
