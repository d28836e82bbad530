"""Entry-point discovery from real (throwaway) distributions on sys.path."""

import importlib
import json
import sys
import warnings

import pytest

import distillzoo as dz
from distillzoo.hooks.manager import reset_plugin_manager
from helpers import add_distribution, bhattacharyya_plugin

RAISING_MODULE = '''
import distillzoo as dz

@dz.hookimpl
def register_objectives(register):
    raise KeyError("no config for the GPU build")
'''


@pytest.fixture
def site(tmp_path, monkeypatch, fresh_plugin_manager):
    add_distribution(tmp_path, "kd-bhatta", "1.2", "bhatta", "kd_bhatta", bhattacharyya_plugin())
    add_distribution(tmp_path, "kd-broken", "0.1", "broken", "kd_broken", "raise ImportError('needs a GPU library')\n")
    add_distribution(tmp_path, "kd-raising", "0.3", "raising", "kd_raising", RAISING_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield monkeypatch
    for module in ("kd_bhatta", "kd_broken", "kd_raising"):
        sys.modules.pop(module, None)


def load(monkeypatch, allow="kd-bhatta,kd-broken"):
    if allow is None:
        monkeypatch.delenv("DISTILLZOO_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("DISTILLZOO_PLUGINS", allow)
    reset_plugin_manager()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        names = dz.list_objectives()
    return names, [w for w in caught if issubclass(w.category, dz.PluginWarning)]


def test_broken_plugin_warns_once_naming_its_package_and_the_rest_load(site):
    names, warned = load(site)
    assert "bhattacharyya" in names and {"fkl", "rkl"} <= set(names)
    assert len(warned) == 1
    assert str(warned[0].message) == (
        "distillzoo: plugin 'broken' from package 'kd-broken' failed to load and was skipped: ImportError: needs a GPU library"
    )
    assert dz.objective_spec("bhattacharyya").package == "kd-bhatta"
    [info] = [p for p in dz.plugins_info() if p["name"] == "bhatta"]
    assert (info["package"], info["version"], info["objectives"]) == ("kd-bhatta", "1.2", ["bhattacharyya"])


def test_a_plugin_whose_hook_raises_is_isolated_and_diagnosed(site, capsys):
    from distillzoo.cli import main

    names, warned = load(site, None)  # all three
    assert "bhattacharyya" in names and {"fkl", "rkl"} <= set(names)
    assert sorted(str(w.message) for w in warned) == [
        "distillzoo: plugin 'broken' from package 'kd-broken' failed to load and was skipped: ImportError: needs a GPU library",
        "distillzoo: plugin 'raising' from package 'kd-raising' failed in register_objectives and its objectives were "
        "skipped: KeyError: 'no config for the GPU build'",
    ]
    main(["plugins"])
    info = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    assert info["bhatta"]["objectives"] == ["bhattacharyya"] and info["bhatta"]["problems"] == []
    assert info["raising"]["package"] == "kd-raising" and info["raising"]["version"] == "0.3"
    assert info["raising"]["problems"] == [{"package": "kd-raising", "hook": "register_objectives",
                                            "error": "KeyError: 'no config for the GPU build'"}]
    assert info["broken"]["problems"] == [{"package": "kd-broken", "hook": None,
                                           "error": "failed to load: ImportError: needs a GPU library"}]


@pytest.mark.parametrize("allow, expect_loaded, expect_warning", [
    ("kd-bhatta", True, False),   # by distribution name
    ("KD_Bhatta", True, False),   # names are normalised like pip's
    ("bhatta", True, False),      # by entry-point name
    ("", False, False),           # empty: no third-party plugin at all
    ("kd-broken", False, True),
    ("kd-bhatta,kd-broken", True, True),
])
def test_allow_list(site, allow, expect_loaded, expect_warning):
    names, warned = load(site, allow)
    assert ("bhattacharyya" in names) is expect_loaded
    assert bool(warned) is expect_warning
    assert {"fkl", "rkl"} <= set(names)  # built-ins always load
