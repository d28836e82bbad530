"""Packaging: the wheel ships registry.yaml, and no generic top-level module becomes importable."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from helpers import source_copy

ROOT = Path(__file__).resolve().parents[1]
GENERIC = ("core", "plugins", "kernels")
# a generic name found is ours when it resolves inside distillzoo's folders (a PyPI package named "kernels",
# which transformers requires, may be installed and is not ours)
PROBE = (
    "import importlib.util, os, distillzoo as dz; "
    "print(dz.__file__); "
    "ours = [os.path.dirname(dz.__file__), *%r]; "
    "print([m for m in %r if (s := importlib.util.find_spec(m)) is not None "
    "and any(os.path.realpath(s.origin).startswith(os.path.realpath(d)) for d in ours)]); "
    "print(dz.list_objectives()); "
    "print(dz.objective('fkl', temperature=2.0).temperature)"
) % ([str(ROOT / folder) + os.sep for folder in GENERIC], GENERIC)


def python(*args, cwd, env_path=None):
    env = {"PATH": "/usr/bin:/bin", "DISTILLZOO_PLUGINS": ""}
    if env_path:
        env["PYTHONPATH"] = str(env_path)
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    before = {p: p.stat().st_mtime_ns for p in ROOT.glob("build")}
    source = source_copy(ROOT, out)  # building writes build/ and *.egg-info into the copy, not the checkout
    python("-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source), cwd=out)
    assert {p: p.stat().st_mtime_ns for p in ROOT.glob("build")} == before, "the build wrote into the checkout"
    [built] = out.glob("distillzoo-*.whl")
    return built


@pytest.mark.slow
def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"distillzoo"}
    # every module of the three folders, at its import path (a package left out of pyproject's list is missing)
    sources = {f"distillzoo/{p.relative_to(ROOT / 'core')}" for p in (ROOT / "core").rglob("*.py")} \
        | {f"distillzoo/{folder}/{p.relative_to(ROOT / folder)}" for folder in ("plugins", "kernels")
           for p in (ROOT / folder).rglob("*.py")}
    assert {"distillzoo/plugins/objectives/divergences.py", "distillzoo/training/loop.py"} <= sources
    assert sources | {"distillzoo/registry.yaml", "distillzoo/py.typed"} <= set(names)
    shipped = zipfile.ZipFile(wheel).read("distillzoo/registry.yaml")
    assert shipped == (ROOT / "registry.yaml").read_bytes()


@pytest.mark.slow
def test_installed_wheel_reads_its_registry(wheel, tmp_path):
    target = tmp_path / "site"
    python("-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel), cwd=tmp_path)
    out = python("-c", PROBE, cwd=tmp_path, env_path=target)
    assert out[0] == str(target / "distillzoo" / "__init__.py")  # the wheel, not the source tree
    assert out[1:] == ["[]", "['abkd', 'akl', 'ce', 'dpkd', 'dpkd_token', 'dpo', 'fkl', 'jsd', 'rkl', 'simpo', 'skl', 'srkl', 'taid', 'tvd']", "2.0"]


def test_development_install_exposes_only_distillzoo(tmp_path):
    out = python("-c", PROBE, cwd=tmp_path)
    assert out[1:] == ["[]", "['abkd', 'akl', 'ce', 'dpkd', 'dpkd_token', 'dpo', 'fkl', 'jsd', 'rkl', 'simpo', 'skl', 'srkl', 'taid', 'tvd']", "2.0"]


def test_console_script_lists_the_zoo(tmp_path):
    script = Path(sys.executable).parent / "distillzoo"
    result = subprocess.run([str(script), "list"], cwd=tmp_path, capture_output=True, text=True,
                            env={"PATH": "/usr/bin:/bin", "DISTILLZOO_PLUGINS": ""})
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line.split()[1:3] for line in result.stdout.splitlines()[1:]}
    assert rows["fkl"] == ["logit", "distillzoo"] and rows["rkl"] == ["logit", "distillzoo"]


def test_a_checkout_s_kernels_folder_never_shadows_the_kernels_package(tmp_path):
    """From the repository root, ``python -c`` and ``python -m`` put the root first on sys.path, where kernels/ is
    distillzoo.kernels; transformers imports the PyPI package ``kernels``, which must be what it gets."""
    import importlib.metadata

    probe = ("import kernels, importlib.util; print(kernels.__file__); "
             "import transformers.models.qwen2.modeling_qwen2; import distillzoo.kernels as k; print(k.__name__)")
    env = {"PATH": "/usr/bin:/bin", "DISTILLZOO_PLUGINS": ""}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        real = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    except importlib.metadata.PackageNotFoundError:  # not installed: then no "kernels" at all, as elsewhere
        assert done.returncode != 0 and "No module named 'kernels'" in done.stderr
        return
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [str(real), "distillzoo.kernels"]
    version = subprocess.run([sys.executable, "-m", "distillzoo", "--version"], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("distillzoo "), version.stderr
