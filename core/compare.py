"""``distillzoo compare CONFIG``: entrants trained under one budget, judged on metrics none of them trains on.

::

    base:                        # a train config without an objective, shared by every entrant
      student: {tiny: {hidden_size: 32, num_layers: 2}}
      teacher: {path: runs/quickstart/teacher/final}   # given once, shared, and the judge of the divergences
      data: {streams: [{name: tasks, path: data/quickstart/train.jsonl, format: chat, repeat: 1}], max_length: 64}
      train: {steps: 200, batch_size: 16, lr: 3.0e-3, warmup_steps: 10, log_every: 10, eval_every: 50}
    held_out: {path: data/quickstart/eval.jsonl, format: chat}     # what the report is on
    validation: {path: data/val.jsonl, format: chat}               # what a learning-rate grid is tuned on
    entrants:
      - {name: fkl, objective: {name: fkl}}
      - {name: ce+fkl, objectives: [{name: ce, weight: 0.5}, {name: fkl, weight: 0.5}]}
      - {name: abkd, objective: {name: abkd, alpha: 0.5}, lr: [1.0e-3, 3.0e-3]}   # a plugin's, by name
    seeds: [0, 1, 2]
    lr_grid: null                # a grid for every entrant that gives none
    output_dir: runs/compare

Fair by construction:

* for one seed, every entrant starts from the same student (a tiny student's init
  seed is the run's seed; a pretrained one is the same weights) and sees the same
  batches in the same order for the same steps and schedule;
* no gradient clipping (``train.max_grad_norm: null``): one global threshold clips
  some loss scales and never others;
* the held-out split is also each run's ``data.eval``, for the curves (every
  ``train.eval_every`` steps; a quarter of the run when the base gives none);
* an entrant with more than one learning rate trains each on the first seed and
  keeps the one with the lowest validation NLL; the report is on the held-out split;
* the held-out metrics are no entrant's own objective alone: greedy exact match,
  NLL per response token, and forward KL, reverse KL and TVD from the teacher, each
  per response token over the full vocab.

Each run is ``distillzoo train`` in a subprocess under
``output_dir/runs/ENTRANT/seedS-lrLR`` (its own metrics.jsonl and checkpoints), so
its wall time and peak resident memory are its own. A run whose ``result.json``
holds what is needed is skipped, so rerunning an interrupted comparison finishes it
and gives the same report. Written to ``output_dir``: results.csv and results.json
(one row per run), report.md (mean ± std over seeds, ranks, and which entrants are
within each other's spread in exact match and NLL; then wall time, tokens/s and peak memory), curves.png and bars.png.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .atomic import write_text_atomically
from .config import load_config
from .errors import ConfigError, DistillzooError
from .trainer import validate

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
    if not isinstance(raw, dict) or set(raw) - {"path", "format"} or "path" not in raw:
        raise ConfigError(f"{where}: {key} must be {{path: FILE, format: NAME}}, got {raw!r}")
    return {"path": str(raw["path"]), "format": str(raw.get("format", "chat"))}


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
            validate(cfg, where=f"{where}: entrant {e.name!r}")
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


# ---------------------------------------------------------------------------- running and judging one run
def _train(plan: Plan, entrant: Entrant, seed: int, lr: float, say) -> dict:
    """Train one run in its own process (skipped when its final student exists); its cost."""
    directory = run_dir(plan, entrant, seed, lr)
    cost_file = directory / "cost.json"
    if (directory / "final").is_dir() and cost_file.is_file():
        return json.loads(cost_file.read_text(encoding="utf-8"))
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "compare_run.yaml"
    write_text_atomically(config, yaml.safe_dump(run_config(plan, entrant, seed, lr), sort_keys=False))
    say(f"train {entrant.name} seed {seed} lr {lr:g}")
    started = time.perf_counter()
    with open(directory / "train.log", "w", encoding="utf-8") as log:
        child = subprocess.Popen([sys.executable, "-m", "distillzoo", "train", str(config)], stdout=log,
                                 stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode != 0:
        tail = (directory / "train.log").read_text(encoding="utf-8", errors="replace")[-2000:]
        raise DistillzooError(f"compare: run {directory} failed (exit {child.returncode}); its log ends:\n{tail}")
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    cost = {"wall_s": time.perf_counter() - started, "tokens_per_s": sum(speeds) / max(len(speeds), 1),
            "peak_rss_mib": usage.ru_maxrss / 1024}  # Linux reports KiB
    write_text_atomically(cost_file, json.dumps(cost) + "\n")
    return cost


class Judge:
    """The held-out (and validation) metrics of a trained student, against the one shared teacher."""

    def __init__(self, plan: Plan) -> None:
        from .causal_lm import model_from_config
        from .tokenizer import load_tokenizer

        first = plan.entrants[0]
        cfg = load_config(run_config(plan, first, plan.seeds[0], first.lrs[0]))
        self.tokenizer, self.system = load_tokenizer(), cfg.data.system  # as the runs tokenize
        self.teacher = model_from_config(cfg.teacher, "teacher").eval()

    def __call__(self, student_dir: Path, split: dict) -> dict:
        from .causal_lm import load_causal_lm
        from .evaluation import exact_match, response_divergences, response_nll
        from .shards import ConversationDataset

        student = load_causal_lm(str(student_dir))
        data = ConversationDataset(split["path"], split["format"], self.tokenizer, system=self.system)
        result = {"exact_match": exact_match(student, self.tokenizer, split["path"], split["format"], system=self.system,
                                             max_new_tokens=16, group_by=None)["exact_match"],
                  "nll": response_nll(student, data, self.tokenizer.pad_id)}
        result.update(response_divergences(self.teacher, student, data, self.tokenizer.pad_id, ("fkl", "rkl", "tvd")))
        return result


def _result(plan: Plan, judge, entrant: Entrant, seed: int, lr: float, splits: tuple[str, ...], say) -> dict:
    """One run's row: trained if needed, judged on ``splits`` (cached in its result.json)."""
    directory = run_dir(plan, entrant, seed, lr)
    cost = _train(plan, entrant, seed, lr, say)
    path = directory / "result.json"
    done = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    for split in splits:
        if split not in done:
            done[split] = judge()(directory / "final", plan.held_out if split == "held_out" else plan.validation)
            write_text_atomically(path, json.dumps(done, indent=1) + "\n")
    return {"entrant": entrant.name, "seed": seed, "lr": lr, **cost, **{f"{s}/{k}": v for s in done for k, v in
                                                                       done[s].items()}}


def compare(path: str | Path, say=print) -> dict:
    """Run (or finish) the comparison ``path`` describes; writes and returns the results."""
    plan = load_plan(path)
    plan.out.mkdir(parents=True, exist_ok=True)
    judge_cache: list = []

    def judge():
        if not judge_cache:
            judge_cache.append(Judge(plan))
        return judge_cache[0]

    rows, chosen = [], {}
    for e in plan.entrants:
        if len(e.lrs) > 1:  # tuned on the first seed, on the validation split
            tuning = [_result(plan, judge, e, plan.seeds[0], lr, ("validation",), say) for lr in e.lrs]
            chosen[e.name] = min(tuning, key=lambda r: r["validation/nll"])["lr"]
            rows += [{**r, "tuning": True} for r in tuning if r["lr"] != chosen[e.name]]
        else:
            chosen[e.name] = e.lrs[0]
        for seed in plan.seeds:
            rows.append({**_result(plan, judge, e, seed, chosen[e.name], ("held_out",), say), "tuning": False})
    results = {"config": str(path), "output_dir": str(plan.out), "seeds": plan.seeds, "chosen_lr": chosen, "runs": rows,
               "summary": summarise(rows, [e.name for e in plan.entrants])}
    write_text_atomically(plan.out / "results.json", json.dumps(results, indent=1) + "\n")
    _write_csv(plan.out / "results.csv", rows)
    write_text_atomically(plan.out / "report.md", report(plan, results))
    _plots(plan, results)
    return results


# ---------------------------------------------------------------------------- what is written
def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(rows: list[dict], names: list[str]) -> dict:
    """Per entrant: mean and std (over seeds, held-out runs only) of each metric and cost, and its rank."""
    summary = {}
    for name in names:
        runs = [r for r in rows if r["entrant"] == name and not r.get("tuning")]
        summary[name] = {k: _mean_std([r[k] for r in runs]) for k in
                         [f"held_out/{m}" for m in METRICS] + ["wall_s", "tokens_per_s", "peak_rss_mib"]}
    order = sorted(names, key=lambda n: (-summary[n]["held_out/exact_match"][0], summary[n]["held_out/nll"][0]))
    def close(a: str, b: str, key: str) -> bool:
        return abs(summary[a][key][0] - summary[b][key][0]) <= max(summary[a][key][1], summary[b][key][1])

    for rank, name in enumerate(order, 1):
        summary[name]["rank"] = rank  # told apart from another only where exact match or NLL differs beyond spread
        summary[name]["within_spread"] = [other for other in order if other != name
                                          and close(name, other, "held_out/exact_match")
                                          and close(name, other, "held_out/nll")]
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())


def report(plan: Plan, results: dict) -> str:
    """report.md: the metrics table (mean ± std, ranks, ties within spread), then the cost table."""
    summary, chosen = results["summary"], results["chosen_lr"]
    order = sorted(summary, key=lambda k: summary[k]["rank"])
    lines = [f"# distillzoo compare: {results['config']}", "",
             f"{len(plan.entrants)} entrants x {len(plan.seeds)} seed(s) {plan.seeds}; held-out split "
             f"{plan.held_out['path']}. Every entrant starts from the same student per seed, sees the same batches "
             "for the same steps and schedule, and trains without gradient clipping. Metrics are per response token "
             "against the shared teacher; mean ± std over seeds (sample std). Ranked by exact match, then NLL.", "",
             "| rank | entrant | lr | " + " | ".join(SHOWN[m][0] for m in METRICS) + " | within spread |",
             "|" + "---|" * (len(METRICS) + 4)]
    for name in order:
        s = summary[name]

        def cell(key, scale=1.0, digits=3):
            mean, std = s[key]
            return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"

        metrics = [cell("held_out/exact_match", 100, 1) + "%"] + [cell(f"held_out/{m}") for m in METRICS[1:]]
        lines.append(f"| {s['rank']} | {name} | {chosen[name]:g} | " + " | ".join(metrics) + " | "
                     + (", ".join(s["within_spread"]) or "-") + " |")
    lines += ["", "'within spread': the entrants whose mean exact match and mean NLL each differ from this one's by no "
              "more than the larger of the two standard deviations; those differences are not told apart from seed "
              "noise.", "",
              "## Cost (mean over seeds, this machine)", "", "| entrant | wall s | tokens/s | peak RSS MiB |",
              "|---|---|---|---|"]
    lines += [f"| {n} | {summary[n]['wall_s'][0]:.1f} | {summary[n]['tokens_per_s'][0]:.0f} | "
              f"{summary[n]['peak_rss_mib'][0]:.0f} |" for n in order]
    return "\n".join(lines) + "\n"


def _plots(plan: Plan, results: dict) -> None:
    try:
        import matplotlib
    except ImportError:
        return  # the report and results files are complete without them (distillzoo[plot] draws them)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import read_curves

    names = [e.name for e in plan.entrants]
    colors = {n: plt.get_cmap("tab10")(i % 10) for i, n in enumerate(names)}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for e in plan.entrants:
        dirs = [run_dir(plan, e, s, results["chosen_lr"][e.name]) for s in plan.seeds]
        curves = read_curves(dirs, ["eval/nll"])["eval/nll"]
        by_step: dict[int, list[float]] = {}
        for points in curves.values():
            for step, value in points:
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        means = [_mean_std(by_step[s])[0] for s in steps]
        ax.plot(steps, means, marker="o", markersize=3, label=e.name, color=colors[e.name])
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out NLL (nats/token), mean over seeds")
    ax.set_title("held-out NLL during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(plan.out / "curves.png", dpi=120)
    plt.close(fig)

    summary = results["summary"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (key, label, scale) in zip(axes, [("held_out/exact_match", "held-out exact match (%)", 100),
                                              ("held_out/fkl", "held-out KL(teacher||student) (nats/token)", 1)]):
        means = [summary[n][key][0] * scale for n in names]
        stds = [summary[n][key][1] * scale for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=[colors[n] for n in names])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.set_title(f"{label.split(' (')[0]}: mean ± std over {len(plan.seeds)} seed(s)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(plan.out / "bars.png", dpi=120)
    plt.close(fig)
