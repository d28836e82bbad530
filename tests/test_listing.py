"""`distillzoo list` without torch: the built-ins from registry.yaml, plugins from a cache that knows when it is stale."""

import json
import os
import subprocess
import sys

import distillzoo as dz
from distillzoo.hooks.manager import reset_plugin_manager
from helpers import add_distribution, bhattacharyya_plugin

PROBE = ("import sys, contextlib, io, json\n"
         "from distillzoo.cli import main\n"
         "out = io.StringIO()\n"
         "with contextlib.redirect_stdout(out):\n"
         "    main(['list', '--json'])\n"
         "print(json.dumps({'torch': 'torch' in sys.modules, 'entries': json.loads(out.getvalue())}))\n")

def listed(env):
    done = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                          check=True)
    return json.loads(done.stdout.splitlines()[-1]), done.stderr


def loaded_catalogue():
    """The catalogue as the loaded plugins give it (imports every objective)."""
    return sorted((s.as_dict() for s in dz.objective_specs().values()), key=lambda e: e["name"])


def test_the_built_ins_are_listed_without_torch_exactly_as_the_loaded_objectives_give_them(tmp_path):
    got, _ = listed({"DISTILLZOO_PLUGINS": "", "DISTILLZOO_CACHE_DIR": str(tmp_path)})
    assert got["torch"] is False
    assert got["entries"] == loaded_catalogue()  # registry.yaml and the registered classes agree, field by field


def test_a_plugin_is_imported_once_then_listed_from_the_cache_until_its_files_change(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    add_distribution(site, "kd-bhatta", "1.2", "bhatta", "kd_bhatta", bhattacharyya_plugin("first"))
    env = {"PYTHONPATH": str(site), "DISTILLZOO_PLUGINS": "kd-bhatta", "DISTILLZOO_CACHE_DIR": str(tmp_path / "c")}
    cold, _ = listed(env)
    assert cold["torch"] is True  # nothing cached yet: the plugin is imported
    entry = {e["name"]: e for e in cold["entries"]}["bhattacharyya"]
    assert (entry["package"], entry["summary"], entry["kind"]) == ("kd-bhatta", "first", "logit")
    assert entry["params"]["temperature"]["default"] == 1.0  # its kind's shared params, merged in
    warm, _ = listed(env)
    assert warm == {"torch": False, "entries": cold["entries"]}

    module = site / "kd_bhatta.py"
    module.write_text(module.read_text().replace('"first"', '"second one"'))
    changed, _ = listed(env)
    assert changed["torch"] is True
    assert {e["name"]: e for e in changed["entries"]}["bhattacharyya"]["summary"] == "second one"

    monkeypatch.syspath_prepend(str(site))  # the same plugins, loaded in this process, give the same list
    monkeypatch.setenv("DISTILLZOO_PLUGINS", "kd-bhatta")
    reset_plugin_manager()
    try:
        assert listed(env)[0] == {"torch": False, "entries": loaded_catalogue()}
    finally:
        sys.modules.pop("kd_bhatta", None)
        reset_plugin_manager()


def test_a_broken_plugin_is_never_cached_so_it_is_reported_every_time(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    add_distribution(site, "kd-broken", "0.1", "broken", "kd_broken", "raise ImportError('needs a GPU library')\n")
    env = {"PYTHONPATH": str(site), "DISTILLZOO_PLUGINS": "kd-broken", "DISTILLZOO_CACHE_DIR": str(tmp_path / "c")}
    for _ in range(2):
        got, err = listed(env)
        assert "plugin 'broken' from package 'kd-broken' failed to load" in err
        assert "fkl" in {e["name"] for e in got["entries"]}
    assert not (tmp_path / "c" / "catalogue.json").exists()
