"""The docs site builds with ``mkdocs build --strict``, and its reference pages say what the code does.

The build fails on any warning: a broken link or anchor, a link to a repository file that
does not exist (docs/hooks.py checks those), a page left out of the nav, a docstring Griffe
cannot parse. The API pages are read statically from the source through the import layout
docs/hooks.py lays out (core/ as ``distillzoo``, with plugins/ and kernels/ inside).
"""

from __future__ import annotations

import argparse
import html
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's banner about its successor, not ours
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config_dir / "mkdocs.yml"),
                           "-d", str(site)], cwd=config_dir, capture_output=True, text=True, env=env, timeout=300)


def text_of(page: Path) -> str:
    body = re.sub(r"<script.*?</script>|<style.*?</style>", "", page.read_text(encoding="utf-8"), flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", body)))


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    done = build(ROOT, out)
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr[-4000:]}"
    return out


def test_the_site_builds_strict_with_every_page(site):
    nav = re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(nav) == pages, "every page under docs/ is in mkdocs.yml's nav, and the nav names no other"
    for page in pages:
        stem = page.removesuffix(".md").removesuffix("index").rstrip("/")
        assert (site / stem / "index.html").is_file(), f"{page} was not built"


def test_the_api_pages_render_the_public_names_from_their_docstrings(site):
    objectives = text_of(site / "api" / "objectives" / "index.html")
    training = text_of(site / "api" / "training" / "index.html")
    plugins = text_of(site / "api" / "plugins" / "index.html")
    # dz.LogitObjective and dz.Algorithm load lazily at run time: the docs build sees them under their public names
    assert "A divergence between teacher and student next-token distributions" in objectives
    assert "A training algorithm: one step of distillzoo train" in training
    assert "Run every check of the kit on a LogitObjective subclass" in plugins  # distillzoo.testing
    assert "Declare distillation objectives" in plugins  # the hookspecs
    for page in (objectives, training, plugins):
        assert ":class:`" not in page and ":func:`" not in page, "reST roles are shown as code names"


def test_linked_repository_files_are_served_with_the_site(site):
    assert (site / "repo" / "bench" / "README.md").is_file()
    assert (site / "repo" / "bench" / "results" / "compare-quickstart" / "curves.png").is_file()
    compare = (site / "compare" / "index.html").read_text(encoding="utf-8")
    assert 'src="../repo/bench/results/compare-quickstart/curves.png"' in compare


def test_a_broken_link_or_a_page_left_out_of_the_nav_fails_the_build(tmp_path):
    for entry in ("core", "plugins", "kernels", "bench", "examples", "configs", "data", "registry.yaml", "README.md"):
        (tmp_path / entry).symlink_to(ROOT / entry)
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(DOCS, tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "docs" / "unlisted.md").write_text("# Not in the nav\n", encoding="utf-8")
    with (tmp_path / "docs" / "index.md").open("a", encoding="utf-8") as f:
        f.write("\n[gone](objectivez.md) [no anchor](objectives.md#no-such-heading) [no file](../bench/NOPE.md)\n")
    done = build(tmp_path, tmp_path / "site")
    assert done.returncode != 0
    for named in ("unlisted.md", "objectivez.md", "#no-such-heading", "../bench/NOPE.md"):
        assert named in done.stderr, f"the failed build does not name {named}:\n{done.stderr[-3000:]}"


# ------------------------------------------------------------------------------------------ reference pages
def _block_after(page: Path, heading: str) -> list[str]:
    text = page.read_text(encoding="utf-8")
    section = text[text.index(heading):]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_the_layers_on_the_architecture_page_are_the_ones_import_linter_checks():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = pyproject["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    assert _block_after(DOCS / "architecture.md", "## Layers") == layers


def test_the_commands_page_has_a_section_for_every_command_and_no_other():
    from distillzoo.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    sections = re.findall(r"^### ([\w-]+)$", (DOCS / "reference" / "cli.md").read_text(encoding="utf-8"), re.M)
    assert sorted(sections) == sorted(sub.choices)


def test_the_environment_page_names_every_variable_the_code_reads():
    read = set()
    for folder in ("core", "plugins", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            read |= set(re.findall(r"\b(DISTILLZOO_[A-Z_]+|TRITON_INTERPRET|MLFLOW_TRACKING_URI)\b", path.read_text()))
    page = (DOCS / "reference" / "environment.md").read_text(encoding="utf-8")
    assert {"DISTILLZOO_PLUGINS", "DISTILLZOO_BACKEND"} <= read
    missing = sorted(v for v in read if f"`{v}`" not in page)
    assert not missing, f"docs/reference/environment.md does not document {missing}"
