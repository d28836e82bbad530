"""A comparison's plan: the entrants, seeds and splits a compare config describes, and each run's train config.

::

    base: {...}            # a train config without an objective, shared by every entrant
    held_out: {path, format}
    validation: {path, format}     # what a learning-rate grid is tuned on
    decoding: {samples: 1, temperature: 0.0, top_p: 1.0, max_new_tokens: null, seed: 0}   # the judged answers
    entrants: [{name, objective | objectives, algorithm?, lr?}]
    seeds: [0, 1, 2]
    lr_grid: null
    output_dir: runs/compare

:func:`load_plan` checks every run's train config (names, params, data, models; every
entrant, rate and seed) before anything trains; :func:`run_config` is what fairness fixes
for one run (the seed, the tiny student's init seed, no gradient clipping, the held-out
split as ``data.eval``).

The bookkeeping that lets a rerun reuse what is done, and nothing else:

* a run is keyed by its **definition** (:func:`run_definition`): its train config as
  :func:`~distillzoo.config.load_config` resolves it (every default filled in, so ``lr:
  1e-3`` and ``lr: 0.001`` are one config), keys whose value is null dropped (a null and an
  absent key are one config once the defaults are in), as canonical JSON (sorted keys, no
  spaces), and the sha256 of that text. Nothing is left out: a key that cannot change the
  trained weights (``train.log_every``, ``output_dir``) still changes the run's files.
  The runner writes it to ``RUN_DIR/definition.json`` (``{"format": 1, "sha256": ...,
  "config": {...}}``) when the run starts; :func:`check_runs` refuses a comparison whose
  output_dir holds a run directory of another definition (or of none), naming the keys that
  differ, before anything trains. So every run a report ranks was trained under the config
  it describes, and for one seed every entrant's differs from another's only in its
  objective, algorithm and learning rate (checked by :func:`load_plan`).
* a judgement is keyed by its split's content (:func:`split_key`): path, format, columns and
  the sha256 of the bytes (of every file under a directory, in sorted order); one stored
  under another key is judged again.
* a run's directory is ``runs/ENTRANT/seed{S}-lr{LR}`` with ``LR`` = :func:`lr_name`, which
  reads back as exactly the rate, so two distinct rates never share a directory.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from distillzoo.config import load_config
from distillzoo.data.tables import kind as table_kind
from distillzoo.errors import ConfigError, DistillzooError
from distillzoo.training.spec import resolve

KEYS = ("base", "entrants", "seeds", "held_out", "validation", "decoding", "lr_grid", "serve_teacher",
        "output_dir")
def served_name(plan: "Plan") -> str:
    """The name the teacher served for every entrant (``serve_teacher``) answers to: ``compare-teacher-`` and a hash
    of ``base.teacher``, so that a run's definition changes with the teacher, and a server of another teacher on
    the port is told apart."""
    digest = hashlib.sha256(json.dumps(plan.base["teacher"], sort_keys=True).encode()).hexdigest()[:12]
    return f"compare-teacher-{digest}"
#: what a seed may be: numpy's seed range, as ``distillzoo train`` checks ``seed``
SEEDS = range(0, 2**32)
#: the version of definition.json's layout
DEFINITION_FORMAT = 1


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
    #: how the judge draws each student's answers (:class:`~distillzoo.teacher.evaluation.Decoding`'s fields)
    decoding: dict = field(default_factory=dict)
    #: {(entrant name, seed, lr): run_definition(...)}, filled by load_plan
    definitions: dict = field(default_factory=dict, repr=False)
    #: ``{top_k, port}``: base.teacher served once by ``distillzoo serve`` for every entrant, or None
    serve_teacher: dict | None = None

    @property
    def teacher_url(self) -> str:
        return f"http://127.0.0.1:{self.serve_teacher['port']}"


def _decoding(raw, where: str) -> dict:
    """The ``decoding`` section, checked: the fields of a :class:`~distillzoo.teacher.evaluation.Decoding`."""
    from dataclasses import asdict, fields

    from distillzoo.teacher.evaluation import Decoding

    raw = {} if raw is None else raw
    known = [f.name for f in fields(Decoding)]
    if not isinstance(raw, dict) or set(raw) - set(known):
        extra = sorted(set(raw) - set(known)) if isinstance(raw, dict) else raw
        raise ConfigError(f"{where}: decoding: how the judge draws the answers, a mapping of {known}; got {extra!r}")
    try:
        return asdict(Decoding(**raw))
    except (DistillzooError, TypeError) as e:
        raise ConfigError(f"{where}: decoding: {str(e).removeprefix('decoding: ')}") from None


def _split(raw, key: str, where: str) -> dict | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"path", "format", "columns"} or "path" not in raw \
            or not isinstance(raw.get("columns") or {}, dict):
        raise ConfigError(f"{where}: {key} must be {{path: FILE, format: NAME, columns: {{FIELD: COLUMN}} (optional)}}, "
                          f"got {raw!r}")
    return {"path": str(raw["path"]), "format": str(raw.get("format", "chat")),
            **({"columns": dict(raw["columns"])} if raw.get("columns") else {})}


def _rate(value) -> float | None:
    """A learning rate read as a train config reads ``train.lr`` (omegaconf's float: an int, a float, or a string
    ``float()`` reads, such as ``1e-3``, which YAML 1.1 and so PyYAML leave a string); None if it is not one > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        rate = float(value)
    except ValueError:
        return None
    return rate if math.isfinite(rate) and rate > 0 else None


def _lrs(raw, key: str, where: str) -> list[float] | None:
    if raw is None:
        return None
    values = raw if isinstance(raw, list) else [raw]
    rates = [_rate(v) for v in values]
    if not values or None in rates:
        raise ConfigError(f"{where}: {key} must be a learning rate > 0 or a non-empty list of them, got {raw!r}")
    for i, rate in enumerate(rates):
        first = rates.index(rate)
        if first != i:
            raise ConfigError(f"{where}: {key}: {values[first]!r} and {values[i]!r} are one learning rate "
                              f"({lr_name(rate)}) given twice; each rate of a grid is one run: give it once")
    return rates


def _base_lr(train: dict, where: str) -> float:
    """The rate of an entrant that gives none, with no lr_grid: base's ``train.lr`` (or its default)."""
    rate = _rate(train.get("lr", 1e-4))
    if rate is None:
        raise ConfigError(f"{where}: base.train.lr must be a learning rate > 0, got {train.get('lr')!r} (a grid is "
                          "lr_grid, or an entrant's lr)")
    return rate


def lr_name(lr: float) -> str:
    """How a learning rate is written in its run directory's name (and in what the runner says): ``{lr:g}``
    where that reads back as exactly ``lr`` (0.003, 1e-05), else the shortest text that does (``repr``:
    0.0010000001). ``float(lr_name(lr)) == lr`` always, so distinct rates get distinct names."""
    short = f"{lr:g}"
    return short if float(short) == lr else repr(float(lr))


def _seeds(seeds, where: str) -> list[int]:
    if not isinstance(seeds, list) or not seeds:
        raise ConfigError(f"{where}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    for i, s in enumerate(seeds):
        if isinstance(s, bool) or not isinstance(s, int) or s not in SEEDS:
            raise ConfigError(f"{where}: seeds[{i}]: {s!r} is not a seed: a seed is an integer in [0, 2**32) "
                              "(numpy's seed range)")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: seeds must be a non-empty list of distinct integers, got {seeds!r}")
    return seeds


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
    seeds = _seeds(raw.get("seeds", [0]), where)
    grid = _lrs(raw.get("lr_grid"), "lr_grid", where)
    train = base.get("train") if isinstance(base.get("train"), dict) else {}  # not a mapping: load_config says so
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
                                or [_base_lr(train, where)]))
    validation = _split(raw.get("validation"), "validation", where)
    tuned = [e.name for e in entrants if len(e.lrs) > 1]
    if tuned and validation is None:
        raise ConfigError(f"{where}: validation: entrants {tuned} have a learning-rate grid, which is tuned on a "
                          "validation split; add validation: {path, format}")
    if tuned and table_kind(validation["path"]) in (None, "prepared"):  # judged after the grid trained: say it now
        raise ConfigError(f"{where}: validation.path: {validation['path']!r} is no records file or datasets "
                          "directory (the learning-rate grid is tuned on it)")
    plan = Plan(where, base, entrants, seeds, _split(raw["held_out"], "held_out", where), validation,
                Path(str(raw["output_dir"])), _decoding(raw.get("decoding"), where),
                serve_teacher=_serve_teacher(raw.get("serve_teacher"), where))
    for e in entrants:  # names, params, data and models of every run, before the first one trains
        for lr in e.lrs:
            for seed in seeds:
                label = f"entrant {e.name!r}" + (f", lr {lr_name(lr)}" if len(e.lrs) > 1 else "") \
                    + (f", seed {seed}" if seed != seeds[0] else "")
                try:
                    cfg = load_config(run_config(plan, e, seed, lr))
                except DistillzooError as err:
                    raise ConfigError(f"{where}: {label}: {str(err).removeprefix('<dict>: ')}") from None
                # the entrants share base's data: its records are read and tokenized once, for the first run
                resolve(cfg, where=f"{where}: {label}", read_data=not plan.definitions,
                        check_resume=False)  # compare skips a finished run and reruns an unmeasured one afresh
                plan.definitions[e.name, seed, lr] = _definition(cfg)
    _check_same_budget(plan)
    return plan


def _serve_teacher(raw, where: str) -> dict | None:
    """The ``serve_teacher`` section, checked: ``{top_k: K, port: P}`` (port default 8765: it is in every run's
    definition, so it must not change between the runs of one comparison)."""
    if raw is None or raw is False:
        return None
    raw = {} if raw is True else raw
    if not isinstance(raw, dict) or set(raw) - {"top_k", "port"} or "top_k" not in raw:
        raise ConfigError(f"{where}: serve_teacher: give {{top_k: K, port: P}} (the log-probs per token every entrant "
                          f"reads from the served teacher; the port, default 8765), got {raw!r}")
    top_k, port = raw["top_k"], raw.get("port", 8765)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= 64:
        raise ConfigError(f"{where}: serve_teacher.top_k: an integer in [1, 64] (distillzoo serve's --max-logprobs), "
                          f"got {top_k!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}: serve_teacher.port: a port number, got {port!r}")
    return {"top_k": top_k, "port": port}


def run_dir(plan: Plan, entrant: Entrant, seed: int, lr: float) -> Path:
    return plan.out / "runs" / entrant.name / f"seed{seed}-lr{lr_name(lr)}"


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
    if plan.serve_teacher is not None:  # every entrant reads the one served teacher's top-k
        cfg["teacher"] = {"server": plan.teacher_url, "model": served_name(plan), "top_k": plan.serve_teacher["top_k"]}
    return cfg


# ---------------------------------------------------------------------------------------------- run definitions
def _pruned(value):
    """``value`` without the null-valued keys of its mappings (at any depth; list items stay)."""
    if isinstance(value, dict):
        return {k: _pruned(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def _definition(cfg) -> dict:
    """definition.json of a run whose train config :func:`load_config` resolved to ``cfg``."""
    config = _pruned(OmegaConf.to_container(cfg, resolve=True))
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return {"format": DEFINITION_FORMAT, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "config": config}


def run_definition(plan: Plan, entrant: Entrant, seed: int, lr: float) -> dict:
    """What defines one run, as written to its definition.json: ``{"format": 1, "sha256": ..., "config":
    {...}}``, ``sha256`` being that of ``config`` as canonical JSON (see the module docstring)."""
    found = plan.definitions.get((entrant.name, seed, lr))
    if found is None:
        found = plan.definitions[entrant.name, seed, lr] = _definition(load_config(run_config(plan, entrant, seed, lr)))
    return found


#: what may differ between two runs of one comparison: the entrant's own terms, its rate, the seed, where it is
_PER_RUN = ("objective", "objectives", "algorithm", "train.lr", "seed", "student.tiny.seed", "output_dir")


def _check_same_budget(plan: Plan) -> None:
    """The report says every entrant had the same start, data, steps and schedule: true of the run configs, or
    the plan is refused (a guard on :func:`run_config`; it holds by construction)."""
    shared = None
    for (name, seed, lr), definition in plan.definitions.items():
        rest = {k: v for k, v in _flat(definition["config"]).items()
                if not any(k == p or k.startswith(p + ".") or k.startswith(p + "[") for p in _PER_RUN)}
        if shared is None:
            shared = (name, seed, lr, rest)
        elif rest != shared[3]:
            key = next(k for k in list(rest) + list(shared[3]) if rest.get(k, _ABSENT) != shared[3].get(k, _ABSENT))
            raise DistillzooError(f"{plan.where}: internal: the runs of {shared[0]!r} (seed {shared[1]}) and {name!r} "
                                  f"(seed {seed}) differ in {key}, which compare fixes for every run")


_ABSENT = object()


def _flat(config) -> dict:
    """A config's leaves by dotted path (``train.steps``, ``data.streams[0].path``); an empty mapping or list is
    a leaf."""
    flat: dict = {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list) and value:
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            flat[key] = value

    walk(config, "")
    return flat


def _shown(value) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, ensure_ascii=False)


def differences(old: dict, new: dict, limit: int = 5) -> list[str]:
    """``["train.steps: 4 -> 8", ...]``: the leaves where two configs differ, in ``new``'s order (then ``old``'s
    keys that ``new`` lacks), at most ``limit`` of them and a count of the rest."""
    a, b = _flat(old), _flat(new)
    keys = [k for k in dict.fromkeys([*b, *a]) if a.get(k, _ABSENT) != b.get(k, _ABSENT)]
    shown = [f"{k}: {_shown(a.get(k, _ABSENT))} -> {_shown(b.get(k, _ABSENT))}" for k in keys[:limit]]
    return shown + ([f"and {len(keys) - limit} more"] if len(keys) > limit else [])


def _stored_definition(directory: Path, new: dict) -> str | None:
    """Why the run directory cannot be reused for a run of definition ``new`` (None: it can)."""
    path = directory / "definition.json"
    if not path.is_file():
        if not any(directory.iterdir()):
            return None  # empty: nothing there to keep
        return ("holds files but no definition.json (written by an older distillzoo, or not by compare), so "
                "nothing says which config trained it")
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        sha, config = stored["sha256"], stored["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its definition.json cannot be read ({type(e).__name__}: {e})"
    if sha == new["sha256"]:
        return None
    return "; ".join(differences(config, new["config"])) or \
        f"its definition's sha256 {sha[:12]}... is not this config's {new['sha256'][:12]}..."


def check_runs(plan: Plan) -> None:
    """Refuse, before anything trains, an output_dir holding a run directory that this plan would reuse but that
    was written for another definition, or by a layout that kept none; nothing is trained, changed or deleted.
    The ConfigError names each such directory and the keys that differ (``train.steps: 4 -> 8``)."""
    problems = []
    for e in plan.entrants:
        for lr in e.lrs:
            for seed in plan.seeds:
                directory = run_dir(plan, e, seed, lr)
                if directory.is_dir():
                    why = _stored_definition(directory, run_definition(plan, e, seed, lr))
                    if why is not None:
                        problems.append(f"  {directory}: {why}")
    if problems:
        shown = problems[:10] + ([f"  and {len(problems) - 10} more"] if len(problems) > 10 else [])
        one = len(problems) == 1
        raise ConfigError(
            f"{plan.where}: output_dir {str(plan.out)!r} holds {len(problems)} run director{'y' if one else 'ies'} "
            f"that this config would reuse but that {'was' if one else 'were'} not trained under it (a rerun would "
            f"rank {'it' if one else 'them'} beside the new runs as if trained alike); nothing was trained, changed "
            "or deleted:\n"
            + "\n".join(shown) + "\nTo compare under this config, give it a new output_dir; to retrain one of these "
            "runs under it, delete that run directory (its trained student goes with it); or rerun the config that "
            "trained them.")


# ---------------------------------------------------------------------------------------------- split keys
def _sha256_file(path: Path, into=None):
    digest = into or hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def split_key(split: dict, name: str = "split") -> dict:
    """What a judgement on ``split`` ({path, format, columns?}) is keyed by: ``{path, format, columns, sha256}``,
    ``sha256`` being that of the file's bytes, or for a directory (a datasets save_to_disk one) of the lines
    ``SHA256  RELATIVE/PATH`` of every file under it, in sorted order (what ``sha256sum`` would list)."""
    path = Path(split["path"])
    if path.is_file():
        sha = _sha256_file(path).hexdigest()
    elif path.is_dir():
        files = sorted((p for p in path.rglob("*") if p.is_file()), key=lambda p: p.relative_to(path).as_posix())
        manifest = "".join(f"{_sha256_file(p).hexdigest()}  {p.relative_to(path).as_posix()}\n" for p in files)
        sha = hashlib.sha256(manifest.encode("utf-8")).hexdigest()
    else:
        raise ConfigError(f"{name}.path: {str(path)!r} does not exist")
    return {"path": str(split["path"]), "format": split.get("format"), "columns": split.get("columns"), "sha256": sha}
