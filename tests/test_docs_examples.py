"""The code blocks of README.md and docs/: every block a reader would copy runs here, as it is shown.

Sybil parses the Markdown. The blocks of one page run in order, in one Python namespace
and one scratch directory (below), each as its own test:

* ``python``: executed.
* ``bash``: each command runs in the page's scratch directory. ``distillzoo ...`` (or
  ``python -m distillzoo ...``) runs in this process through ``distillzoo.cli.main``, the
  console script's entry point, and must exit 0; ``COMMAND > FILE`` writes its output to
  FILE. ``python -m distillzoo.MODULE`` and a few read-only tools (``cat``, ``head``,
  ``tail``, ``ls``, ``wc``) run as subprocesses. Any other command is refused: its block
  needs a skip directive.
* ``yaml``: a config, written to a file and checked; a block whose first line is a comment
  naming a file (``# gen.yaml``) is also saved under that name, for the commands after it.
  A train config without one of ``student``, ``data`` and ``output_dir`` is a fragment: its
  top-level sections replace those of ``distillzoo config fkl``'s starter config (with an
  ``output_dir`` of its own). The result is loaded with ``dz.load_config`` and checked as
  ``distillzoo check`` checks it (the run spec, ``resolve``: every check ``train`` makes
  before a model loads). A ``distillzoo compare``
  config (top-level ``entrants``) is checked by compare's own ``load_plan``. A block that
  names a file the reader brings, by an absolute path (``/models/Qwen2.5-7B-Instruct``), is
  only loaded; a relative path it names must exist in the scratch directory.
* ``json``: data records, one JSON object a line; each must pass the reader of the format
  its fields name (dolly, alpaca, chat or preference).
* ``toml``: parsed; a ``[project.entry-points.distillzoo]`` table must map names to modules.
* ``text`` (a program's output) and ``mermaid`` (a diagram) are shown, not run.

A block that needs a GPU, a real model, an install, several processes or minutes has, on
the line before it, ``<!-- skip: next "why" -->``; the reason becomes the skip reason.

The scratch directory holds copies of the repository's data/ and configs/, a link to
examples/, and at runs/quickstart/teacher/final a tiny Qwen2-architecture teacher (the
real vocab, random weights) standing in for the one examples/quickstart.py trains.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
RUN = ("python", "bash", "yaml", "json", "toml")
SHOWN = ("text", "mermaid")  # program output and diagrams: nothing to copy
READ_ONLY = ("cat", "head", "tail", "ls", "wc")
MODEL_KEYS = ("path", "cache")
TRAIN_KEYS = ("student", "data", "output_dir")  # a train config without one of these is a fragment
COMPARE_KEYS = ("base", "entrants", "seeds", "held_out", "validation", "lr_grid", "output_dir")


# ------------------------------------------------------------------------------------------ evaluators
def _cwd() -> Path:
    return Path.cwd()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    from distillzoo.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:  # --help, --version, an argparse error
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue(), err.getvalue()


def _commands(text: str) -> list[str]:
    return [c for c in text.replace("\\\n", " ").splitlines() if c.strip() and not c.lstrip().startswith("#")]


def run_bash(example) -> None:
    for line in _commands(example.parsed):
        argv = shlex.split(line, comments=True)
        target = None
        if ">" in argv:
            i = argv.index(">")
            argv, target = argv[:i], argv[i + 1]
        if argv[:1] == ["distillzoo"] or argv[:3] == ["python", "-m", "distillzoo"]:
            code, out, err = _cli(argv[1:] if argv[0] == "distillzoo" else argv[3:])
        elif argv[0] in READ_ONLY or (argv[:2] == ["python", "-m"] and argv[2].startswith("distillzoo.")):
            argv = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
            done = subprocess.run(argv, capture_output=True, text=True, cwd=_cwd(), timeout=120)
            code, out, err = done.returncode, done.stdout, done.stderr
        else:
            raise AssertionError(f"{line!r}: the docs tests run distillzoo commands and {list(READ_ONLY)} only; put "
                                 '<!-- skip: next "why" --> before a block that cannot run here')
        assert code == 0, f"{line!r} exited {code}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}"
        if target is not None:
            Path(target).write_text(out, encoding="utf-8")


def _files_named(cfg: dict) -> list[str]:
    """Every file or directory a train / generate / score config (or a compare base) names as input."""
    named = []
    for role in ("student", "teacher", "reference"):
        section = cfg.get(role) or {}
        named += [str(section[k]) for k in MODEL_KEYS if section.get(k) is not None]
    data = cfg.get("data") or {}
    named += [str(s["path"]) for s in (data.get("streams") or []) if isinstance(s, dict) and "path" in s]
    named += [str(data[k]["path"]) if k == "eval" else str(data[k]) for k in ("eval", "tokenizer")
              if data.get(k) is not None]
    named += [str(cfg[s][k]) for s, k in (("generate", "prompts"), ("score", "data"))
              if isinstance(cfg.get(s), dict) and cfg[s].get(k) is not None]
    return named


def _missing(files: list[str]) -> list[str]:
    """The absolute paths among ``files`` that do not exist (the reader's own models and data); a relative one
    that does not exist is an error in the docs."""
    missing = [f for f in files if not Path(f).exists()]
    typos = [f for f in missing if not Path(f).is_absolute()]
    assert not typos, (f"the block names {typos}, which the scratch directory lacks: create it in an earlier block "
                       "of the page, or name a file the reader brings by an absolute path")
    return missing


def _starter() -> dict:
    from distillzoo.starter import starter_config

    return yaml.safe_load(starter_config("fkl"))


CHECKED: dict[str, str] = {}  # "doc:line" -> how a yaml block was checked (for the report in the summary)


def check_yaml(example) -> None:
    import distillzoo as dz

    raw = yaml.safe_load(example.parsed)
    assert isinstance(raw, dict), "a config block must be a mapping of keys"
    named = re.match(r"#\s*([\w./-]+\.ya?ml)\s*$", example.parsed.splitlines()[0])
    if named:  # "save this as gen.yaml": the commands after the block use it
        Path(named.group(1)).write_text(example.parsed, encoding="utf-8")
    where = f"{Path(example.path).name}:{example.line}"
    path = _cwd() / f"block-{example.line}.yaml"
    if "entrants" in raw:
        from distillzoo.compare.plan import load_plan

        unknown = sorted(set(raw) - set(COMPARE_KEYS))
        assert not unknown, f"unknown compare keys {unknown}"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        files = _files_named(raw.get("base") or {}) + [str(raw[k]["path"]) for k in ("held_out", "validation")
                                                      if isinstance(raw.get(k), dict)]
        missing = _missing(files)
        if missing:
            for entrant in raw["entrants"]:  # each entrant's objective at least
                dz.load_config({k: v for k, v in entrant.items() if k in ("objective", "objectives", "algorithm")})
            CHECKED[where] = f"compare entrants loaded (missing: {missing})"
        else:
            load_plan(path)
            CHECKED[where] = "compare plan checked (load_plan)"
        return
    fragment = not any(k in raw for k in ("generate", "score")) and not all(k in raw for k in TRAIN_KEYS)
    base = _starter()
    if "objective" in raw or "objectives" in raw:
        base.pop("objective"), base.pop("objectives", None)
    # a fragment trains where no other block's run is (the starter's output_dir may hold one already)
    cfg = {**base, "output_dir": f"runs/block-{example.line}", **raw} if fragment else raw
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True) if fragment else example.parsed,
                    encoding="utf-8")  # a whole config as written, so an error's file:line is the block's
    missing = _missing(_files_named(cfg))
    if missing:
        dz.load_config(path)
        CHECKED[where] = f"loaded (missing: {missing})"
        return
    code, out, err = _cli(["check", str(path)])
    assert code == 0, f"distillzoo check of the block ({'a fragment, on the fkl starter' if fragment else 'as is'}) " \
                      f"exited {code}:\n{err[-3000:]}"
    CHECKED[where] = out.strip().splitlines()[-1].removeprefix("# ")


#: the fields that tell a record's format (a JSON block of records is checked with that format's reader)
FORMAT_FIELDS = (("preference", {"chosen", "rejected"}), ("chat", {"messages"}), ("dolly", {"instruction", "response"}),
                 ("alpaca", {"instruction", "output"}))


def check_records(example) -> None:
    import json

    from distillzoo.data.records import data_format

    lines = [line for line in example.parsed.splitlines() if line.strip()]
    assert lines, "an empty block of records"
    for n, line in enumerate(lines, 1):
        record = json.loads(line)
        fmt = next((name for name, fields in FORMAT_FIELDS if fields <= set(record)), None)
        assert fmt is not None, f"record {n} has the fields of no format: {sorted(record)}"
        data_format(fmt)(record)  # a DataError names the field


def check_toml(example) -> None:
    data = tomllib.loads(example.parsed)
    group = data.get("project", {}).get("entry-points", {}).get("distillzoo")
    if group is not None:
        assert group and all(isinstance(v, str) and re.fullmatch(r"[A-Za-z_][\w.]*(:[\w.]+)?", v)
                             for v in group.values()), f"entry points must map names to modules: {group}"


SYBIL = Sybil(parsers=[PythonCodeBlockParser(), CodeBlockParser("bash", run_bash), CodeBlockParser("yaml", check_yaml),
                       CodeBlockParser("json", check_records),
                       CodeBlockParser("toml", check_toml), SkipParser()], path=str(ROOT))


# ------------------------------------------------------------------------------------------ the pages
class Page:
    """One document: its examples, evaluated in order, each once, in its own scratch directory."""

    def __init__(self, doc: str, scratch: Path) -> None:
        self.document = SYBIL.parse(ROOT / doc)
        self.examples = list(self.document)
        self.scratch = scratch
        self.done = 0

    def run_through(self, index: int) -> None:
        with _inside(self.scratch):
            while self.done < index:  # the ones before (skip directives, and blocks already reported)
                example = self.examples[self.done]
                self.done += 1
                with contextlib.suppress(Exception), _environment_kept():
                    example.evaluate()
            self.done += 1
            with _environment_kept():
                self.examples[index].evaluate()


@contextlib.contextmanager
def _environment_kept():
    """A block that sets environment variables (DISTILLZOO_BACKEND, ...) leaves the rest of the suite alone."""
    before = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


@contextlib.contextmanager
def _inside(directory: Path):
    before = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def _cases():
    cases = []
    for doc in DOCUMENTS:
        for i, example in enumerate(SYBIL.parse(ROOT / doc)):
            language = example.region.lexemes.get("arguments")
            if language in RUN:
                cases.append(pytest.param(doc, i, id=f"{doc}:{example.line}:{language}"))
    return cases


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny random teacher where the quickstart leaves its trained one (real vocab, tied embeddings)."""
    from distillzoo.models.causal_lm import tiny_qwen2

    out = tmp_path_factory.mktemp("teacher") / "final"
    tiny_qwen2(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, tie_word_embeddings=True,
               seed=1).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pages(tmp_path_factory, teacher):
    made: dict[str, Page] = {}

    def page(doc: str) -> Page:
        if doc not in made:
            scratch = tmp_path_factory.mktemp(re.sub(r"\W", "-", doc))
            shutil.copytree(ROOT / "data", scratch / "data")
            shutil.copytree(ROOT / "configs", scratch / "configs")
            (scratch / "examples").symlink_to(ROOT / "examples")
            (scratch / "runs" / "quickstart" / "teacher").mkdir(parents=True)
            (scratch / "runs" / "quickstart" / "teacher" / "final").symlink_to(teacher)
            made[doc] = Page(doc, scratch)
        return made[doc]

    yield page
    from distillzoo.hooks.manager import reset_plugin_manager

    reset_plugin_manager()  # a page may register a plugin by hand


@pytest.mark.parametrize("doc, index", _cases())
def test_block(doc, index, pages):
    pages(doc).run_through(index)


# ------------------------------------------------------------------------------------------ no block left out
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<info>[^\n`]*)$", re.MULTILINE)
_SKIP = re.compile(r"<!--\s*skip:\s*(\w+)(.*?)-->", re.DOTALL)


def _fences(text: str) -> list[tuple[int, str]]:
    """(line, info string) of every opening fence."""
    out, open_fence = [], None
    for m in _FENCE.finditer(text):
        if open_fence is None:
            open_fence = m.group("fence")
            out.append((text.count("\n", 0, m.start()) + 1, m.group("info").strip()))
        elif m.group("fence").startswith(open_fence) and not m.group("info").strip():
            open_fence = None
    return out


@pytest.mark.parametrize("doc", DOCUMENTS)
def test_every_block_is_run_or_shown(doc):
    """Each fenced block names a language this module runs (python, bash, yaml, json, toml) or shows (text, mermaid),
    Sybil finds every block that runs, and every skip carries its reason."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    fences = _fences(text)
    unknown = [(line, info) for line, info in fences if info.split()[:1] not in ([lang] for lang in RUN + SHOWN)]
    assert not unknown, f"{doc}: blocks with no language or one the docs tests neither run nor show: {unknown}"
    runnable = [line for line, info in fences if info in RUN]
    parsed = [e.line for e in SYBIL.parse(ROOT / doc) if e.region.lexemes.get("arguments") in RUN]
    assert parsed == runnable, f"{doc}: Sybil found the runnable blocks at lines {parsed}, the fences are at {runnable}"
    for action, reason in _SKIP.findall(text):
        assert action == "next" and re.fullmatch(r'\s*"[^"]+"\s*', reason), \
            f"{doc}: write skips as <!-- skip: next \"why\" --> (got skip: {action}{reason})"
