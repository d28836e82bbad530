"""A comparison's plan: the entrants, seeds and splits a compare config describes, and each run's train config.

::

    base: {...}            # a train config without an objective, shared by every entrant
    held_out: {path, format}
    validation: {path, format}     # what a learning-rate grid is tuned on
    entrants: [{name, objective | objectives, algorithm?, lr?}]
    seeds: [0, 1, 2]
    lr_grid: null
    output_dir: runs/compare

:func:`load_plan` checks every run's train config (names, params, data, models) before
anything trains; :func:`run_config` is what fairness fixes for one run (the seed, the
tiny student's init seed, no gradient clipping, the held-out split as ``data.eval``).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from distillzoo.config import load_config
from distillzoo.errors import ConfigError, DistillzooError
from distillzoo.training.spec import resolve

KEYS = ("base", "entrants", "seeds", "held_out", "validation", "lr_grid", "output_dir")
METRICS = ("exact_match", "nll", "fkl", "rkl", "tvd")
#: (label, higher is better) of each reported metric
SHOWN = {"exact_match": ("exact match", True), "nll": ("NLL/token", False), "fkl": ("KL(t‖s)/token", False),
         "rkl": ("KL(s‖t)/token", False), "tvd": ("TVD/token", False)}


@dataclass
class Entrant:
    name: str
    terms: dict          # {"objective": {...}} or {"objectives": [...]}, plus an optional "algorithm"
    lrs: list[float]


@dataclass
class Plan:
    where: str
    base: dict
    entrants: list[Entrant]
    seeds: list[int]
    held_out: dict
    validation: dict | None
    out: Path


def _split(raw, key: str, where: str) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"path", "format", "columns"} or "path" not in raw \
            or not isinstance(raw.get("columns") or {}, dict):
        raise ConfigError(f"{where}: {key} must be {{path: FILE, format: NAME, columns: {{FIELD: COLUMN}} (optional)}}, "
                          f"got {raw!r}")
    return {"path": str(raw["path"]), "format": str(raw.get("format", "chat")),
            **({"columns": dict(raw["columns"])} if raw.get("columns") else {})}


def _lrs(raw, key: str, where: str) -> list[float] | None:
    if raw is None:
        return None
    values = raw if isinstance(raw, list) else [raw]
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                             for v in values):
        raise ConfigError(f"{where}: {key} must be a learning rate > 0 or a non-empty list of them, got {raw!r}")
    return [float(v) for v in values]


def load_plan(path: str | Path) -> Plan:
    """The comparison a config describes, every run's train config checked before anything trains."""
    where = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"compare config {where!r} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with {list(KEYS)}")
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a compare config has {list(KEYS)}")
    for key in ("base", "entrants", "held_out", "output_dir"):
        if raw.get(key) is None:
            raise ConfigError(f"{where}: {key} is missing")
    base = raw["base"]
    if not isinstance(base, dict):
        raise ConfigError(f"{where}: base must be a train config (a mapping)")
    shared = sorted(k for k in ("objective", "objectives", "algorithm", "output_dir", "seed") if k in base)
    if shared:
        raise ConfigError(f"{where}: base.{shared[0]}: each entrant brings its own objective and algorithm, and "
                          "compare sets seed and output_dir per run; remove it from base")
    teacher = base.get("teacher") or {}
    if not (teacher.get("path") or teacher.get("tiny")):
        raise ConfigError(f"{where}: base.teacher: compare needs a teacher model (path or tiny): it is shared by "
                          "the entrants and judges the held-out divergences")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool)
                                                           for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    grid = _lrs(raw.get("lr_grid"), "lr_grid", where)
    if not isinstance(raw["entrants"], list) or not raw["entrants"]:
        raise ConfigError(f"{where}: entrants must be a non-empty list of {{name, objective or objectives}}")
    entrants, names = [], set()
    for i, e in enumerate(raw["entrants"]):
        key = f"entrants[{i}]"
        if not isinstance(e, dict) or not isinstance(e.get("name"), str) \
                or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*", e["name"]):
            raise ConfigError(f"{where}: {key}.name: give each entrant a name of letters, digits and _.+=-")
        if e["name"] in names:
            raise ConfigError(f"{where}: {key}.name: {e['name']!r} is used twice; names key the runs")
        names.add(e["name"])
        extra = sorted(set(e) - {"name", "objective", "objectives", "algorithm", "lr"})
        if extra or ("objective" in e) == ("objectives" in e):
            raise ConfigError(f"{where}: {key}: an entrant has a name, one of objective or objectives, and optionally "
                              f"algorithm and lr" + (f"; unknown key(s) {extra}" if extra else ""))
        terms = {k: e[k] for k in ("objective", "objectives", "algorithm") if k in e}
        entrants.append(Entrant(e["name"], terms, _lrs(e.get("lr"), f"{key}.lr", where) or grid
                                or [float(base.get("train", {}).get("lr", 1e-4))]))
    validation = _split(raw.get("validation"), "validation", where)
    tuned = [e.name for e in entrants if len(e.lrs) > 1]
    if tuned and validation is None:
        raise ConfigError(f"{where}: validation: entrants {tuned} have a learning-rate grid, which is tuned on a "
                          "validation split; add validation: {path, format}")
    plan = Plan(where, base, entrants, seeds, _split(raw["held_out"], "held_out", where), validation,
                Path(str(raw["output_dir"])))
    for e in entrants:  # names, params, data and models of every run, before the first one trains
        for lr in e.lrs:
            try:
                cfg = load_config(run_config(plan, e, seeds[0], lr))
            except DistillzooError as err:
                raise ConfigError(f"{where}: entrant {e.name!r}: {str(err).removeprefix('<dict>: ')}") from None
            # the entrants share base's data: its records are read and tokenized once, for the first run
            resolve(cfg, where=f"{where}: entrant {e.name!r}", read_data=e is entrants[0] and lr == e.lrs[0],
                    check_resume=False)  # compare skips a finished run and reruns an unmeasured one afresh
    return plan


def run_dir(plan: Plan, entrant: Entrant, seed: int, lr: float) -> Path:
    return plan.out / "runs" / entrant.name / f"seed{seed}-lr{lr:g}"


def run_config(plan: Plan, entrant: Entrant, seed: int, lr: float) -> dict:
    """The train config of one run: the base, the entrant's objective, and what fairness fixes."""
    cfg = copy.deepcopy(plan.base)
    cfg.update(copy.deepcopy(entrant.terms))
    cfg["seed"] = seed
    if (cfg.get("student") or {}).get("tiny") is not None:
        cfg["student"]["tiny"]["seed"] = seed  # one initial student per seed, the same for every entrant
    train = cfg.setdefault("train", {})
    train.update(lr=lr, max_grad_norm=None, progress=False)
    if not train.get("eval_every"):  # the held-out curves: four points unless the base says how often
        train["eval_every"] = max(1, int(train.get("steps", 100)) // 4)
    cfg.setdefault("data", {})["eval"] = {"name": "held-out", **plan.held_out}
    cfg["output_dir"] = str(run_dir(plan, entrant, seed, lr))
    cfg["resume"] = "auto"
    return cfg
