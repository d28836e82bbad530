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
* the held-out metrics are no entrant's own objective alone: greedy exact match
  (overall and per task, where records have a ``task`` field), NLL per response
  token, and forward KL, reverse KL and TVD from the teacher, each per response
  token over the full vocab (one fused pass for the four).

Each run is the ``distillzoo train`` loop in a child forked from a fork server (one
process that imported torch, transformers and the plugins once; see
:mod:`distillzoo.forkserver`), under ``output_dir/runs/ENTRANT/seedS-lrLR`` (its own
metrics.jsonl and checkpoints), so its wall time and peak resident memory are its
own and a run that crashes takes no other with it. The same child then judges the
run. A run with a final student and a ``cost.json`` is not trained again, and one
with its splits in ``result.json`` is not judged again, so rerunning an interrupted
comparison finishes it and gives the same report. (A run stopped between its final
save and its cost is trained again from scratch, so that its cost is measured.)
Written to ``output_dir``: results.csv and results.json (one row per run),
report.md (mean ± std over seeds, ranks, which entrants are within each other's
spread in exact match and NLL, exact match per task; then wall time, tokens/s and
peak memory), curves.png and bars.png.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from .atomic import write_text_atomically
from .config import load_config
from .errors import ConfigError, DistillzooError
from .forkserver import ForkServer
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
#: what the fork server imports and loads once, so that each run's child starts with it
PRELOAD = ["distillzoo.compare:warm"]


def warm() -> None:
    """Import the trainer, the judge and every plugin, and load the tokenizer (in the fork server)."""
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (the tiny and Qwen models' code)

    from . import evaluation, trainer  # noqa: F401
    from .manager import algorithm_specs, components, objective_specs
    from .tokenizer import load_tokenizer

    objective_specs(), algorithm_specs(), components("data_formats"), components("trainer_callbacks")
    load_tokenizer()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def run_child(directory: str, train: bool, splits: dict[str, dict]) -> None:
    """In a forked child: train the run ``directory/compare_run.yaml`` describes (if ``train``), then
    judge its final student on each of ``splits`` ({name: {path, format}}), adding to result.json.

    The cost (wall time of training, mean tokens/s, the process's peak RSS) is written to
    cost.json as soon as training ends, before the judge loads anything.
    """
    import resource

    from .run_dir import RunDir
    from .trainer import train as train_run

    directory = Path(directory)
    config = directory / "compare_run.yaml"
    cfg = load_config(config)
    if train:
        resumed = cfg.resume == "auto" and bool(RunDir(directory).checkpoints())
        started = time.perf_counter()
        train_run(cfg, where=str(config))
        wall = time.perf_counter() - started
        records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
        speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        cost = {"wall_s": wall, "tokens_per_s": sum(speeds) / max(len(speeds), 1),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
                "resumed": resumed}  # a resumed run's wall time is its last attempt's
        write_text_atomically(directory / "cost.json", json.dumps(cost) + "\n")
    if splits:
        judge = Judge(cfg)
        done = _read_json(directory / "result.json") or {}
        for name, split in splits.items():
            done[name] = judge(directory / "final", split)
            write_text_atomically(directory / "result.json", json.dumps(done, indent=1) + "\n")


class Judge:
    """The held-out (and validation) metrics of a trained student, against the run's teacher."""

    def __init__(self, cfg) -> None:
        from .causal_lm import model_from_config
        from .tokenizer import load_tokenizer

        self.tokenizer, self.system = load_tokenizer(cfg.data.tokenizer), cfg.data.system  # as the run tokenizes
        self.teacher = model_from_config(cfg.teacher, "teacher").eval()

    def __call__(self, student_dir: Path, split: dict) -> dict:
        """Greedy exact match (overall, and per task where records have one), then NLL and forward KL,
        reverse KL and TVD per response token in one fused pass."""
        from .causal_lm import load_causal_lm
        from .evaluation import exact_match, instruction_records, response_divergences
        from .shards import ConversationDataset

        student = load_causal_lm(str(student_dir))
        # answers longer than every reference are wrong anyway: one token more shows where each stops
        columns = split.get("columns")
        longest = max(len(self.tokenizer.encode(reply)) for _, _, reply, _ in
                      instruction_records(split["path"], split["format"], columns))
        em = exact_match(student, self.tokenizer, split["path"], split["format"], system=self.system,
                         max_new_tokens=longest + 1, columns=columns)
        result = {"exact_match": em["exact_match"],
                  **{f"exact_match/{task}": v for task, v in em.get("by_task", {}).items()}}
        data = ConversationDataset(split["path"], split["format"], self.tokenizer, system=self.system, columns=columns)
        measured = response_divergences(self.teacher, student, data, self.tokenizer.pad_id, ("ce", "fkl", "rkl", "tvd"))
        result.update(nll=measured.pop("ce"), **measured)
        return result


def _result(plan: Plan, server: ForkServer, entrant: Entrant, seed: int, lr: float, splits: tuple[str, ...],
            say) -> dict:
    """One run's row: trained if it has no final student and cost yet, judged on the ``splits`` its
    result.json lacks, both in one forked child."""
    directory = run_dir(plan, entrant, seed, lr)
    finished = (directory / "final").is_dir()
    cost = _read_json(directory / "cost.json") if finished else None
    if cost is None:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "result.json").unlink(missing_ok=True)  # it judged a student this run replaces
        cfg = run_config(plan, entrant, seed, lr)
        if finished:
            cfg["resume"] = "never"  # trained, but stopped before its cost was written: measure it again
        write_text_atomically(directory / "compare_run.yaml", yaml.safe_dump(cfg, sort_keys=False))
        say(f"train {entrant.name} seed {seed} lr {lr:g}")
    done = _read_json(directory / "result.json") or {}
    todo = {s: plan.held_out if s == "held_out" else plan.validation for s in splits if s not in done}
    if cost is None or todo:
        log = directory / ("train.log" if cost is None else "judge.log")
        code = server.run("distillzoo.compare:run_child", {"directory": str(directory), "train": cost is None,
                                                           "splits": todo}, log)
        if code != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise DistillzooError(f"compare: run {directory} failed (exit {code}); its log ends:\n{tail}")
        cost, done = _read_json(directory / "cost.json"), _read_json(directory / "result.json")
    return {"entrant": entrant.name, "seed": seed, "lr": lr, **cost,
            **{f"{s}/{k}": v for s in done for k, v in done[s].items()}}


def compare(path: str | Path, say=print) -> dict:
    """Run (or finish) the comparison ``path`` describes; writes and returns the results."""
    plan = load_plan(path)
    plan.out.mkdir(parents=True, exist_ok=True)
    rows, chosen = [], {}
    with ForkServer(PRELOAD) as server:  # started by the first run that needs training or judging
        for e in plan.entrants:
            if len(e.lrs) > 1:  # tuned on the first seed, on the validation split
                tuning = [_result(plan, server, e, plan.seeds[0], lr, ("validation",), say) for lr in e.lrs]
                chosen[e.name] = min(tuning, key=lambda r: r["validation/nll"])["lr"]
                rows += [{**r, "tuning": True} for r in tuning if r["lr"] != chosen[e.name]]
            else:
                chosen[e.name] = e.lrs[0]
            for seed in plan.seeds:
                rows.append({**_result(plan, server, e, seed, chosen[e.name], ("held_out",), say), "tuning": False})
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
        tasks = sorted({k for r in runs for k in r if k.startswith("held_out/exact_match/")})
        summary[name] = {k: _mean_std([r[k] for r in runs]) for k in
                         [f"held_out/{m}" for m in METRICS] + tasks + ["wall_s", "tokens_per_s", "peak_rss_mib"]}
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
              "noise.", ""]
    tasks = sorted({k.rpartition("/")[2] for s in summary.values() for k in s if k.startswith("held_out/exact_match/")})
    if tasks:
        lines += ["## Exact match per task", "", "| entrant | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for name in order:
            cells = [f"{summary[name][k][0] * 100:.1f} ± {summary[name][k][1] * 100:.1f}%" if k in summary[name] else "-"
                     for k in (f"held_out/exact_match/{t}" for t in tasks)]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Cost (mean over seeds, this machine)", "",
              "Wall time of training alone (the held-out judging is not counted); peak resident memory of the "
              "run's process.", "", "| entrant | wall s | tokens/s | peak RSS MiB |", "|---|---|---|---|"]
    lines += [f"| {n} | {summary[n]['wall_s'][0]:.1f} | {summary[n]['tokens_per_s'][0]:.0f} | "
              f"{summary[n]['peak_rss_mib'][0]:.0f} |" for n in order]
    resumed = sorted({f"{r['entrant']} seed {r['seed']}" for r in results["runs"] if r.get("resumed")})
    if resumed:
        lines += ["", f"Resumed after an interruption, so their wall time is that of the last attempt only: "
                      f"{', '.join(resumed)}."]
    return "\n".join(lines) + "\n"


def _plots(plan: Plan, results: dict) -> None:
    try:
        import matplotlib
    except ImportError:
        return  # the report and results files are complete without them (distillzoo[plot] draws them)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .plots import colours, read_curves

    names = [e.name for e in plan.entrants]
    colors = colours(names)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    plotted = []
    for e in plan.entrants:
        dirs = [run_dir(plan, e, s, results["chosen_lr"][e.name]) for s in plan.seeds]
        curves = read_curves(dirs, ["eval/nll"])["eval/nll"]
        by_step: dict[int, list[float]] = {}
        for points in curves.values():
            for step, value in points:
                by_step.setdefault(step, []).append(value)
        steps = sorted(by_step)
        stats = [_mean_std(by_step[s]) for s in steps]
        means = [m for m, _ in stats]
        ax.plot(steps, means, marker="o", markersize=3, label=e.name, color=colors[e.name])
        ax.fill_between(steps, [m - d for m, d in stats], [m + d for m, d in stats], color=colors[e.name], alpha=0.15,
                        linewidth=0)
        plotted += means
    wide = plotted and min(plotted) > 0 and max(plotted) > 3 * min(plotted)
    if wide:  # one entrant far above the rest would flatten them: a log axis keeps them apart
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FormatStrFormatter("%g"))  # plain numbers, not powers of ten
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out NLL (nats/token)" + (", log scale" if wide else ""))
    ax.set_title(f"held-out NLL during training: mean (line) ± std (band) over {len(plan.seeds)} seed(s)",
                 fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the lines, never on them
    fig.tight_layout()
    fig.savefig(plan.out / "curves.png", dpi=120)
    plt.close(fig)

    summary = results["summary"]
    panels = [("held_out/exact_match", "exact match (%)", 100, "{:.1f}"), ("held_out/nll", "NLL (nats/token)", 1, "{:.2f}"),
              ("held_out/fkl", "KL(teacher||student) (nats/token)", 1, "{:.2f}")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8))
    for ax, (key, label, scale, fmt) in zip(axes, panels):
        means = [summary[n][key][0] * scale for n in names]
        stds = [summary[n][key][1] * scale for n in names]
        bars = ax.bar(range(len(names)), means, yerr=stds, capsize=4, color=[colors[n] for n in names])
        ax.bar_label(bars, labels=[fmt.format(m) for m in means], fontsize=7, padding=2)  # readable when one towers
        ax.set_ylim(0, max(max(m + d for m, d in zip(means, stds)), 1.0 if scale == 100 else 1e-9) * 1.15)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(f"held-out {label}")
        ax.set_title(f"{label.split(' (')[0]}: mean ± std, {len(plan.seeds)} seed(s)", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(plan.out / "bars.png", dpi=120)
    plt.close(fig)
