"""MkDocs hooks of the docs site (``hooks:`` in mkdocs.yml), and the Griffe extension its API pages use.

1. **The import layout for Griffe.** setuptools' ``package-dir`` maps the import
   names ``distillzoo``, ``distillzoo.plugins`` and ``distillzoo.kernels`` to the
   folders core/, plugins/ and kernels/. Griffe finds a package by its folder name,
   so before the build this hook lays out the import layout in a temporary directory
   (``distillzoo/`` holding links to every entry of core/, plus ``plugins`` and
   ``kernels``) and hands it to mkdocstrings as its search path. The API pages are
   then read statically, from the source: nothing is imported, so the build needs
   no torch import and runs no module code (``python -m distillzoo``'s
   ``__main__`` included).
2. **The names ``dz.X`` resolves on first use.** ``distillzoo/__init__.py`` loads its
   torch-backed names lazily (``_LAZY``: name -> home module), which static analysis
   cannot see; the laid-out ``__init__.py`` adds one explicit import per lazy name, so
   ``::: distillzoo.Algorithm`` renders the class under its public name.
3. **Links to repository files.** A page may link to a file outside docs/ as GitHub
   shows it (``../bench/README.md``). Such a link must name a file or folder that
   exists in the repository (else the build fails, as MkDocs fails an internal link
   in strict mode); the file (a folder's README.md) is copied into the site under
   ``repo/`` and the link pointed at the copy, so the site works offline too.

:class:`SphinxRoles` is the Griffe extension (``extensions:`` in mkdocs.yml): the
docstrings cross-reference in reST (``:class:`~distillzoo.Mixture```); on the site
such a role is shown as the code name it refers to.
"""

from __future__ import annotations

import ast
import logging
import posixpath
import re
import tempfile
from pathlib import Path

import griffe
from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
#: the import name of each folder that setuptools' package-dir maps (pyproject.toml)
LAYOUT = {"distillzoo": "core", "distillzoo/plugins": "plugins", "distillzoo/kernels": "kernels"}
REPO_DIR = "repo"  # where linked repository files are copied in the site
log = logging.getLogger("mkdocs.plugins.distillzoo")

_tree: tempfile.TemporaryDirectory | None = None


def import_layout(root: Path = ROOT) -> Path:
    """A temporary directory holding ``distillzoo/`` as it is imported: links to core/'s entries, plugins/ and
    kernels/, and an ``__init__.py`` whose lazy names are explicit imports."""
    global _tree
    _tree = tempfile.TemporaryDirectory(prefix="distillzoo-griffe-")
    top = Path(_tree.name) / "distillzoo"
    top.mkdir()
    nested = {Path(k).name: v for k, v in LAYOUT.items() if "/" in k}
    for entry in (root / LAYOUT["distillzoo"]).iterdir():
        if entry.name in nested or entry.name == "__pycache__":
            continue
        if entry.name == "__init__.py":
            (top / entry.name).write_text(explicit_lazy_names(entry.read_text(encoding="utf-8")), encoding="utf-8")
        else:
            (top / entry.name).symlink_to(entry)
    for name, folder in nested.items():
        (top / name).symlink_to(root / folder)
    return Path(_tree.name)


def explicit_lazy_names(source: str) -> str:
    """``source`` plus ``from MODULE import NAME`` for every entry of its ``_LAZY`` mapping."""
    lazy = None
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            lazy = ast.literal_eval(node.value)
    if lazy is None:
        return source
    lines = [f"from {module} import {', '.join(names)}  # lazy at run time" for module, names in lazy.items()]
    added = "\n".join(lines)
    return f"{source}\n\n# Added for the docs build: the names __getattr__ loads on first use.\n{added}\n"


@event_priority(100)  # before mkdocstrings reads its handlers' config
def on_config(config, **kwargs):
    handler = config["plugins"]["mkdocstrings"].config["handlers"].setdefault("python", {})
    handler["paths"] = [str(import_layout())]
    return config


def on_shutdown(**kwargs):
    if _tree is not None:
        _tree.cleanup()


# ---------------------------------------------------------------------------- links to repository files
_LINK = re.compile(r"(!?\[[^\]\n]*\]\()([^)\s]+)(\))")
_FENCE = re.compile(r"^(```|~~~)")


def _outside_docs(page_uri: str, target: str) -> str | None:
    """The repository path a relative link of page ``page_uri`` names, when it leaves docs/; else None."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return None
    path = target.split("#", 1)[0]
    joined = posixpath.normpath(posixpath.join(posixpath.dirname(page_uri), path))
    if not joined.startswith("../"):
        return None
    return joined[len("../"):]


def on_page_markdown(markdown, page, config, files, **kwargs):
    out, fenced = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line.lstrip()):
            fenced = not fenced
        if not fenced:
            line = _LINK.sub(lambda m: _rewrite(m, page, config, files), line)
        out.append(line)
    return "\n".join(out)


def _rewrite(match, page, config, files) -> str:
    target = match.group(2)
    repo_path = _outside_docs(page.file.src_uri, target)
    if repo_path is None:
        return match.group(0)
    source = ROOT / repo_path
    if source.is_dir() and (source / "README.md").is_file():
        source, repo_path = source / "README.md", posixpath.join(repo_path.rstrip("/"), "README.md")
    if not source.is_file():
        log.warning(f"Doc file '{page.file.src_uri}' contains a link to '{target}', which names no file in the "
                    "repository")
        return match.group(0)
    uri = posixpath.join(REPO_DIR, repo_path)
    if files.get_file_from_path(uri) is None:
        files.append(_StaticCopy.generated(config, uri, abs_src_path=str(source)))
    anchor = target[len(target.split("#", 1)[0]):]
    rel = posixpath.relpath(uri, posixpath.dirname(page.file.src_uri) or ".")
    return f"{match.group(1)}{rel}{anchor}{match.group(3)}"


class _StaticCopy(File):
    """A repository file served as it is (a Markdown file too: it is shown as text, not built into a page)."""

    def is_documentation_page(self) -> bool:
        return False

    def is_static_page(self) -> bool:
        return False


# ---------------------------------------------------------------------------- the Griffe extension
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([^`]+)`")


def sphinx_roles_as_code(text: str) -> str:
    """``:class:`~a.b.C``` -> ```C```, ``:func:`a.b``` -> ```a.b```: reST roles as the code names they name."""
    return _ROLE.sub(lambda m: f"`{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}`", text)


class SphinxRoles(griffe.Extension):
    """Show the docstrings' reST cross-reference roles as code names."""

    def on_object(self, *, obj, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = sphinx_roles_as_code(obj.docstring.value)
