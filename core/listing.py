"""What ``distillzoo list`` and ``distillzoo plugins`` print: the catalogue without torch, and the loaded plugins.

Importing the objectives means importing torch (seconds), but what ``list`` prints
is catalogue data: the built-ins' entries are registry.yaml itself (a meta-test
keeps it and the built-in registrations equal), and a third-party plugin's entries
are what it registered the last time it was imported. Those are kept in a cache
file (``$DISTILLZOO_CACHE_DIR``, else ``$XDG_CACHE_HOME/distillzoo``, else
``~/.cache/distillzoo``), one record per entry point, valid while the plugin's
distribution and version, the size and mtime of every Python file of its module or
package, and distillzoo's version and registry.yaml are unchanged. On any miss,
every plugin is imported as before (warnings and errors included) and the cache is
written again, unless a plugin warned or failed, so a broken plugin keeps being
reported.

:func:`plugins_info` is ``distillzoo plugins``: every plugin, its package, hooks,
what it registered and its problems.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import warnings
from pathlib import Path

from distillzoo.atomic import write_text_atomically
from distillzoo.hooks.catalogue import build_spec, load_registry_yaml
from distillzoo.hooks.manager import (BUILTIN_PACKAGE, COMPONENT_HOOKS, PluginManager, algorithm_registrations,
                                     allowed_entry_points, component_registrations, get_plugin_manager)
from distillzoo.objectives.registry import objective_registrations

CACHE_VERSION = 1


def cache_file() -> Path:
    root = os.environ.get("DISTILLZOO_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                          Path.home() / ".cache") / "distillzoo"
    return Path(root) / "catalogue.json"


def _module_files(module: str) -> list[Path] | None:
    """The Python files of an entry point's module (its whole package, if it is one), found without
    importing it; None where they cannot be found that way."""
    top, *rest = module.split(".")
    try:
        spec = importlib.util.find_spec(top)  # a top-level name: found, not executed
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None or not os.path.isfile(spec.origin):
        return None
    if spec.submodule_search_locations is None:
        return [Path(spec.origin)] if not rest else None
    files = []
    for location in spec.submodule_search_locations:
        files += sorted(Path(location).rglob("*.py"))
    return files


def _key(ep) -> str | None:
    """What an entry point's cached record is valid for, or None if it cannot be told without importing."""
    files = _module_files(ep.module)
    if files is None:
        return None
    dist = ep.dist
    stats = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            return None
        stats.append((str(f), st.st_size, st.st_mtime_ns))
    return json.dumps([ep.name, ep.value, dist.metadata["Name"] if dist else None, dist.version if dist else None,
                       stats])


def _header() -> dict:
    from distillzoo import __version__

    registry = hashlib.sha1(json.dumps(load_registry_yaml(), sort_keys=True, default=str).encode()).hexdigest()
    return {"version": CACHE_VERSION, "distillzoo": __version__, "registry": registry}


def _builtins() -> list[dict]:
    return [build_spec(name, None, entry, BUILTIN_PACKAGE).as_dict()
            for name, entry in load_registry_yaml()["objectives"].items()]


def objective_listing() -> list[dict]:
    """Every objective's catalogue entry (``ObjectiveSpec.as_dict()``), built-in and third-party, by name."""
    eps = allowed_entry_points()
    keys = {ep.name: _key(ep) for ep in eps}
    path = cache_file()
    try:
        cached = json.loads(path.read_text(encoding="utf-8")) if keys else None
    except (OSError, ValueError):
        cached = None
    header = _header()
    if not keys or isinstance(cached, dict) and cached.get("header") == header and all(
            key is not None and key in cached.get("plugins", {}) for key in keys.values()):
        entries = _builtins() + [e for key in keys.values() for e in cached["plugins"][key]]
        names = [e["name"] for e in entries]
        if len(names) == len(set(names)):  # a clash is the full path's to report
            return sorted(entries, key=lambda e: e["name"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registered = objective_registrations()
    for w in caught:  # shown as they would have been; nothing is cached while a plugin has problems
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if not caught and not get_plugin_manager().failed and all(key is not None for key in keys.values()):
        by_plugin: dict[str, list[dict]] = {name: [] for name in keys}
        for r in registered.values():
            if r.plugin in by_plugin:
                by_plugin[r.plugin].append(r.value.as_dict())
        try:
            write_text_atomically(path, json.dumps({"header": header, "plugins": {keys[name]: entries for name, entries
                                                                                  in by_plugin.items()}}) + "\n")
        except OSError:
            pass  # an unwritable cache directory: list works, only slower
    return sorted((r.value.as_dict() for r in registered.values()), key=lambda e: e["name"])


def plugins_info(pm: PluginManager | None = None) -> list[dict]:
    """What ``distillzoo plugins`` prints: each loaded plugin, its package, hooks, names and problems.

    It never raises for a third-party plugin: a broken hook implementation or a name
    clash is listed under that plugin's ``problems``, so the command stays usable to
    diagnose it.
    """
    pm = pm or get_plugin_manager()
    problems: list[dict] = []
    registered = {"objectives": objective_registrations(pm, problems), "algorithms": algorithm_registrations(pm, problems),
                  **{kind: component_registrations(pm, kind, problems) for kind in COMPONENT_HOOKS}}
    info = []
    for name, plugin in sorted(pm.list_name_plugin()):
        package, version = pm.packages.get(name, (name, None))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        info.append({
            "name": name,
            "package": package,
            "version": version,
            "hooks": hooks,
            **{kind: sorted(n for n, r in found.items() if r.plugin == name) for kind, found in registered.items()},
            "problems": [{k: v for k, v in p.items() if k != "plugin"} for p in problems if p["plugin"] == name],
        })
    for name, package, version, error in pm.failed:  # listed too, so the command shows why they are missing
        info.append({"name": name, "package": package, "version": version, "hooks": [],
                     **{kind: [] for kind in registered}, "problems": [{"package": package, "hook": None,
                                                                       "error": f"failed to load: {error}"}]})
    return info
