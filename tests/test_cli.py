"""The distillzoo command line, called in-process."""

import json

import pytest

from distillzoo.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_is_a_table_with_kind_and_package(capsys):
    code, out, _ = run(capsys, "list")
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "KIND", "PACKAGE", "SUMMARY"]
    rows = {line.split()[0]: line.split()[1:3] for line in lines[1:]}
    assert rows["fkl"] == ["logit", "distillzoo"] and rows["rkl"] == ["logit", "distillzoo"]


def test_list_json(capsys):
    code, out, _ = run(capsys, "list", "--json")
    entries = {e["name"]: e for e in json.loads(out)}
    assert entries["fkl"]["params"]["temperature"] == {
        "type": "float", "default": 1.0, "range": "(0, inf)",
        "doc": "softmax temperature tau for both models, p = softmax(z_t / tau), q = softmax(z_s / tau)",
    }


def test_show_prints_formula_params_and_paper(capsys):
    code, out, _ = run(capsys, "show", "rkl")
    assert code == 0
    assert "formula:  tau^2 * sum_v q_v (log q_v - log p_v)" in out
    assert "temperature: float = 1.0 in (0, inf)" in out
    assert "MiniLLM: Knowledge Distillation of Large Language Models (Gu, Dong, Wei, Huang, 2024)" in out
    code, out, _ = run(capsys, "show", "jsd")
    assert code == 0 and "formula:  tau^2 * [beta KL(p||m) + (1-beta) KL(q||m)],  m = beta p + (1-beta) q" in out


def test_show_unknown_name_fails_with_suggestion(capsys):
    code, out, err = run(capsys, "show", "rkll")
    assert code == 2 and out == ""
    assert err.strip() == ("distillzoo show: error: unknown objective or training algorithm 'rkll'. Objectives: abkd, akl, ce, "
                           "dpkd, dpkd_token, dpo, fkl, jsd, rkl, simpo, skl, srkl, taid, tvd; algorithms: distill, dpkd, "
                           "preference. Did you mean 'rkl'?")
    assert run(capsys, "show", "distil")[2].strip().endswith("Did you mean 'distill'?")


def test_show_prints_an_algorithm_s_own_parameters(capsys):
    code, out, _ = run(capsys, "show", "distill")
    assert code == 0 and out.startswith("distill  (training algorithm, package distillzoo)")
    assert "records:  instruction; trains logit objectives" in out
    assert "on_policy: float = 0.0 in [0, 1]" in out and "max_new_tokens: int = 64 in [1, inf)" in out
    assert "On-Policy Distillation of Language Models" in out  # GKD
    code, out, _ = run(capsys, "show", "dpkd")  # an objective and an algorithm of one name: both
    assert code == 0 and "dpkd  (objective, preference, package distillzoo)" in out
    assert "dpkd  (training algorithm, package distillzoo)" in out and "online: bool = False" in out
    code, out, _ = run(capsys, "show", "--json", "dpkd")
    shown = json.loads(out)
    assert shown["objective"]["name"] == shown["algorithm"]["name"] == "dpkd"
    assert list(shown["algorithm"]["params"]) == ["online", "max_new_tokens", "temperature"]
    assert json.loads(run(capsys, "show", "--json", "preference")[1])["params"]["reference"]["default"] == "auto"


def test_plugins_json(capsys):
    code, out, _ = run(capsys, "plugins")
    [builtin] = [p for p in json.loads(out) if p["name"] == "distillzoo.plugins.objectives.divergences"]
    assert builtin["package"] == "distillzoo" and builtin["version"] == "0.1.0"
    assert builtin["objectives"] == ["abkd", "akl", "fkl", "jsd", "rkl", "skl", "srkl", "taid", "tvd"] and builtin["hooks"] == ["register_objectives"]


def test_config_output_is_accepted_by_check(capsys, tmp_path):
    code, out, _ = run(capsys, "config", "fkl")
    assert code == 0 and out.startswith("# distillzoo config: fkl")
    path = tmp_path / "fkl.yaml"
    path.write_text(out)
    code, out, err = run(capsys, "check", str(path), "objective.temperature=2.5")
    assert code == 0, err
    assert "temperature: 2.5" in out and "ForwardKL(temperature=2.5," in out
    assert "# algorithm: Distill(on_policy=0.0, max_new_tokens=64, temperature=1.0, sampler='student')" in out  # the objective's default
    path.write_text("objective: {name: dpkd}\nalgorithm: {name: dpkd, online: true}\n")
    code, out, err = run(capsys, "check", str(path))
    assert code == 0, err
    assert "# algorithm: DPKD(online=True, max_new_tokens=64, temperature=1.0)" in out


def test_check_reports_config_errors(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("objective:\n  name: fkl\n  reduction: avg\n")
    code, _, err = run(capsys, "check", str(path))
    assert code == 2
    assert f"{path}:3: objective.reduction (objective 'fkl'): parameter 'reduction' = 'avg' is not one of" in err


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2


def test_version_and_help_need_no_torch():
    import subprocess
    import sys
    from importlib.metadata import version

    probe = ("import sys, contextlib, io\n"
             "from distillzoo.cli import main\n"
             "for argv in (['--version'], ['--help']):\n"
             "    out = io.StringIO()\n"
             "    with contextlib.redirect_stdout(out):\n"
             "        try:\n"
             "            main(argv)\n"
             "        except SystemExit as e:\n"
             "            assert e.code == 0, e.code\n"
             "    print(out.getvalue().splitlines()[0])\n"
             "print('torch' in sys.modules)\n")
    lines = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines[0] == f"distillzoo {version('distillzoo')}"
    assert lines[1].startswith("usage: distillzoo")
    assert lines[-1] == "False"  # torch is imported only by the commands that need it


def test_show_says_how_each_device_computes_an_objective(capsys):
    code, out, _ = run(capsys, "show", "fkl")
    assert code == 0 and "cuda:     the Triton kernel 'fkl'\n" in out and "sparse teacher: yes" in out
    code, out, _ = run(capsys, "show", "akl")
    assert code == 0 and "cuda:     row chunks, autograd over token_loss\n" in out and "sparse teacher: no\n" in out

    import distillzoo as dz

    class Plugin(dz.PointwiseDivergence):  # a third party's pointwise terms, no kernel of its own
        def pointwise(self, log_p, log_q):
            return (log_p - log_q) ** 2, -2 * (log_p - log_q)

    assert Plugin.paths()["cuda"] == "vocab-chunked torch over its pointwise terms (no [N, V] autograd graph)"
    assert Plugin.paths()["cpu"].endswith("the column path (W @ h.T), over its pointwise terms")
