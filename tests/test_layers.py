"""The layers of the packages, as import-linter contracts (pyproject.toml), hold; breaking one fails.

import-linter reads the package as installed, where distillzoo.plugins and distillzoo.kernels sit inside
distillzoo; the checkout keeps them in their own folders (setuptools package-dir), so each test lints a
copy of the three folders in the installed layout.
"""

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONTRACTS = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["importlinter"]["contracts"]
LINT = Path(sys.executable).with_name("lint-imports")


def installed_layout(tmp_path: Path) -> Path:
    """core/, plugins/ and kernels/ copied as distillzoo/, distillzoo/plugins/, distillzoo/kernels/."""
    top = tmp_path / "site" / "distillzoo"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "core", top, ignore=ignore, symlinks=True)
    shutil.copytree(ROOT / "plugins", top / "plugins", ignore=ignore)
    shutil.copytree(ROOT / "kernels", top / "kernels", ignore=ignore)
    return top


def lint(top: Path) -> tuple[int, str]:
    done = subprocess.run([str(LINT), str(ROOT / "pyproject.toml")], cwd=top.parent, capture_output=True, text=True,
                          env={"PYTHONPATH": str(top.parent), "PATH": "/usr/bin:/bin"}, timeout=300)
    return done.returncode, done.stdout + done.stderr


def test_every_contract_is_kept(tmp_path):
    code, out = lint(installed_layout(tmp_path))
    assert code == 0, out
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out
    assert re.search(r"Analyzed (\d+) files", out) and int(re.search(r"Analyzed (\d+) files", out)[1]) > 60


@pytest.mark.parametrize("module, line, broken", [
    # an objective reaching up into the loop: the layers, the objectives' own contract, and a circle with training
    ("objectives/sparse.py", "from distillzoo.training import loop",
     ["the data's way", "objectives never import", "no import cycles"]),
    # a kernel reaching into the core, which imports the kernels
    ("kernels/backend.py", "from distillzoo.objectives import logit",
     ["the data's way", "kernels import nothing", "no import cycles"]),
    # records and pairs importing each other: a circle between siblings of one package
    ("data/records.py", "from distillzoo.data import pairs", ["no import cycles"]),
])
def test_an_upward_import_or_a_circle_breaks_a_contract(tmp_path, module, line, broken):
    top = installed_layout(tmp_path)
    path = top / module
    path.write_text(path.read_text(encoding="utf-8") + f"\n\ndef _probe():\n    {line}  # noqa\n", encoding="utf-8")
    code, out = lint(top)
    assert code == 1, out
    assert f"{len(CONTRACTS) - len(broken)} kept, {len(broken)} broken" in out
    for name in broken:
        assert re.search(re.escape(name) + r".*BROKEN", out.replace("\n", " ")), out


def _layers() -> list[list[str]]:
    layered = next(c for c in CONTRACTS if c["type"] == "layers")
    return [[m.strip() for m in layer.split("|")] for layer in layered["layers"]]


@pytest.mark.parametrize("package", ["hooks", "objectives", "models", "data", "teacher", "training", "compare",
                                     "plugins"])
def test_each_package_says_what_it_is_for_and_what_it_may_import(package):
    folder = ROOT / ("plugins" if package == "plugins" else f"core/{package}")
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text(encoding="utf-8")))
    assert doc and len(doc.split("May import:")[0].split()) > 20, "a sentence or two on what the package is for"
    stated = set(re.findall(r"distillzoo\.\w+", doc.split("May import:")[1]))
    layers = _layers()
    mine = next(i for i, layer in enumerate(layers) if f"distillzoo.{package}" in layer)
    assert stated == {m for layer in layers[mine + 1:] for m in layer}


def test_no_core_module_is_much_over_500_lines():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / "core").rglob("*.py")}
    assert max(sizes.values()) <= 520, sorted(sizes.items(), key=lambda kv: -kv[1])[:3]


def test_the_loop_module_checks_no_config_values():
    source = (ROOT / "core" / "training" / "loop.py").read_text(encoding="utf-8")
    assert "ConfigError" not in source and "OmegaConf" not in source  # every check lives in training/spec.py
