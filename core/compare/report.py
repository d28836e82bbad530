"""What a comparison writes: the per-entrant summary (means with paired bootstrap intervals, pairwise tests with
Holm's correction, ranks with ties), results.csv, report.md and the plots (held-out NLL curves, metric bars with
their intervals).

The statistics (:mod:`distillzoo.compare.stats`) read every run's per-prompt scores: for one metric an entrant's
table is [seeds, prompts], paired with every other entrant's seed by seed and prompt by prompt.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

from distillzoo.atomic import write_text_atomically
from distillzoo.compare import stats
from distillzoo.compare.plan import Plan, lr_name, run_dir
from distillzoo.errors import DistillzooError
from distillzoo.teacher.evaluation import METRICS, Scores

#: the metrics tested pairwise and ranked, in the report's order (the first ranks the table)
TESTED = ("rouge_l", "exact_match", "nll", "fkl")
ALPHA = 0.05


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def tables(rows: list[dict], names: list[str], split: str = "held_out") -> tuple[dict, dict, list[int]]:
    """``({metric: {entrant: [S, P] sums}}, {metric: weights [P]}, seeds)`` of the held-out runs' per-prompt scores
    (seed by seed in the same order for every entrant, the prompts in the split's order)."""
    runs = {n: sorted((r for r in rows if r["entrant"] == n and not r.get("tuning")), key=lambda r: r["seed"])
            for n in names}
    seeds = [r["seed"] for r in runs[names[0]]]
    scores: dict[str, list[Scores]] = {}
    for n in names:
        if [r["seed"] for r in runs[n]] != seeds:
            raise DistillzooError(f"compare: entrant {n!r} has runs for seeds {[r['seed'] for r in runs[n]]}, "
                                  f"{names[0]!r} for {seeds}: the statistics pair runs seed by seed")
        scores[n] = [Scores.from_json(r[f"{split}/prompts"]) for r in runs[n]]
    first = scores[names[0]][0]
    for n in names:
        for seed, sc in zip(seeds, scores[n]):
            if sc.ids != first.ids:
                raise DistillzooError(f"compare: entrant {n!r} seed {seed} was judged on other prompts than "
                                      f"{names[0]!r}: every run must be judged on the same held-out split")
    metrics = [m for m in METRICS if all(m in sc.sums for n in names for sc in scores[n])]
    table = {m: {n: np.stack([sc.sums[m] for sc in scores[n]]) for n in names} for m in metrics}
    return table, {m: first.weights(m) for m in metrics}, seeds


def summarise(rows: list[dict], names: list[str]) -> dict:
    """Per entrant, each held-out metric's ``{mean, lo, hi, seed_std}`` (the mean over seeds and prompts, its 95%
    paired bootstrap interval over prompts, the std of the per-seed means) and cost; per tested metric the
    pairwise rows (sign-flip test, Holm) and each entrant's rank (1 + entrants significantly better)."""
    table, weights, seeds = tables(rows, names)
    summary: dict = {"entrants": {n: {} for n in names}, "pairs": {}, "ranks": {}, "seeds": seeds,
                     "prompts": int(len(next(iter(weights.values()))))}
    for m, by_entrant in table.items():
        intervals = stats.paired_bootstrap(by_entrant, weights[m])
        for n in names:
            per_seed = [float(v.sum() / weights[m].sum()) for v in by_entrant[n]]
            mean, lo, hi = intervals[n]
            summary["entrants"][n][m] = {"mean": mean, "lo": lo, "hi": hi, "seed_std": _mean_std(per_seed)[1]}
    for m in (m for m in TESTED if m in table):
        if len(names) < 2:
            break
        better_high = bool(METRICS[m].higher_is_better)
        pairs = stats.pairwise(table[m], weights[m], higher_is_better=better_high, alpha=ALPHA)
        summary["pairs"][m] = pairs
        summary["ranks"][m] = stats.ranks(table[m], weights[m], pairs, higher_is_better=better_high)
    for n in names:
        runs = [r for r in rows if r["entrant"] == n and not r.get("tuning")]
        groups = sorted({k for r in runs for k in r
                         if k.startswith("held_out/") and "=" in k and isinstance(r[k], (int, float))})
        summary["entrants"][n]["groups"] = {k.removeprefix("held_out/"): _mean_std([r[k] for r in runs if k in r])[0]
                                            for k in groups}
        summary["entrants"][n].update({k: _mean_std([r[k] for r in runs]) for k in ("wall_s", "tokens_per_s",
                                                                                      "peak_rss_mib")})
    first = next((m for m in TESTED if m in summary["ranks"]), None)
    summary["order"] = (stats.order(table[first], weights[first], summary["ranks"][first],
                                    higher_is_better=bool(METRICS[first].higher_is_better))
                        if first else list(names))
    return summary


def machine() -> str:
    """The machine the runs measured, in words: CPU model, cores, torch's threads, torch's version, the date."""
    import datetime
    import os
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"{datetime.date.today().isoformat()}")


def write_csv(path: Path, rows: list[dict]) -> None:
    """One row per run, its scalar columns (the per-prompt scores stay in each run's result.json)."""
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (dict, list))))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(path, buffer.getvalue())


def _scale(metric: str) -> tuple[int, int]:
    """``(scale, digits)`` a metric is shown with: shares in % to 0.1, the others to 0.001."""
    return (100, 1) if METRICS[metric].share else (1, 3)


def _cell(entry: dict, metric: str) -> str:
    scale, digits = _scale(metric)
    return f"{entry['mean'] * scale:.{digits}f} [{entry['lo'] * scale:.{digits}f}, {entry['hi'] * scale:.{digits}f}]"


def _diff(row: dict, metric: str) -> str:
    scale, digits = _scale(metric)
    return f"{row['diff'] * scale:+.{digits}f} [{row['lo'] * scale:+.{digits}f}, {row['hi'] * scale:+.{digits}f}]"


def findings(summary: dict) -> list[str]:
    """What the tables support, in words: each metric's significantly different pairs, the ties, the limits."""
    lines = []
    for m, pairs in summary["pairs"].items():
        label = METRICS[m].label
        told = [r for r in pairs if r["significant"]]
        if not told:
            lines.append(f"- {label}: no pair of entrants differs significantly (Holm-corrected p >= {ALPHA} for all "
                         f"{len(pairs)} pairs): these runs do not rank the entrants on {label}.")
            continue
        shown = "; ".join(f"{r['better']} over {r['b'] if r['better'] == r['a'] else r['a']} "
                          f"(p_Holm {r['p_holm']:.2g})" for r in sorted(told, key=lambda r: r["p_holm"])[:8])
        more = f" and {len(told) - 8} more" if len(told) > 8 else ""
        lines.append(f"- {label}: {len(told)} of {len(pairs)} pairs differ significantly: {shown}{more}. The other "
                     f"{len(pairs) - len(told)} pairs are not told apart (which is not evidence that they are equal).")
    lines.append(f"- The intervals and tests are over the {summary['prompts']} held-out prompts, at these "
                 f"{len(summary['seeds'])} seed(s) {summary['seeds']}: they say how far the result depends on which "
                 "prompts were drawn, not how it would move with fresh seeds (the seed std column shows that spread; "
                 "with few seeds, read a difference smaller than it with care).")
    return lines


def report(plan: Plan, results: dict) -> str:
    """report.md: the metrics table (means, 95% intervals, ranks with ties), what it supports in words, the
    pairwise table, per task and language, then the cost table."""
    summary, chosen = results["summary"], results["chosen_lr"]
    entrants, order = summary["entrants"], summary["order"]
    shown = [m for m in METRICS if m in entrants[order[0]]]
    ranked = [m for m in TESTED if m in summary["ranks"]]
    split = results.get("held_out") or {}
    lines = [f"# distillzoo compare: {results['config']}", "",
             f"{len(plan.entrants)} entrants x {len(plan.seeds)} seed(s) {plan.seeds}; held-out split "
             f"{plan.held_out['path']} ({summary['prompts']} prompts"
             + (f", sha256 {split['sha256'][:12]}" if split.get("sha256") else "") + f"); answers: "
             f"{results.get('decoding', 'one greedy answer per prompt')}. Every entrant starts from the same student "
             "per seed, sees the same batches for the same steps and schedule, and trains without gradient clipping.",
             "",
             "Each cell: the mean over seeds and prompts [its 95% paired bootstrap interval over prompts, each "
             "prompt's seeds resampled together]; ROUGE-L, exact match and top-1 agreement in %, the others per "
             "response token against the shared teacher. Rank: 1 + the number of entrants significantly better on "
             f"that metric (paired sign-flip test, Holm-corrected over all pairs, alpha {ALPHA}); '=' marks a tie. "
             f"Sorted by {METRICS[ranked[0]].label if ranked else 'entrant'} rank.", "",
             "| entrant | lr | " + " | ".join(f"rank {METRICS[m].label}" for m in ranked) + " | "
             + " | ".join(METRICS[m].label for m in shown) + " |",
             "|" + "---|" * (2 + len(ranked) + len(shown))]
    labels = {m: stats.rank_labels(summary["ranks"][m]) for m in ranked}
    for name in order:
        lines.append(f"| {name} | {lr_name(chosen[name])} | " + " | ".join(labels[m][name] for m in ranked) + " | "
                     + " | ".join(_cell(entrants[name][m], m) for m in shown) + " |")
    lines += ["", "## What the table supports", "", *findings(summary), ""]
    if summary["pairs"]:
        tested = list(summary["pairs"])
        lines += ["## Pairwise differences", "",
                  "a - b: the difference of means [its 95% paired bootstrap interval], then the Holm-corrected "
                  "p-value of the paired sign-flip test; * where significant.", "",
                  "| a | b | " + " | ".join(f"{METRICS[m].label} a - b | p_Holm" for m in tested) + " |",
                  "|---|---|" + "---|---|" * len(tested)]
        for k, row in enumerate(summary["pairs"][tested[0]]):
            cells = []
            for m in tested:
                r = summary["pairs"][m][k]
                cells += [_diff(r, m), f"{r['p_holm']:.3g}{' *' if r['significant'] else ''}"]
            lines.append(f"| {row['a']} | {row['b']} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Seed spread", "", "The std over seeds of each seed's mean.", "",
              "| entrant | " + " | ".join(METRICS[m].label for m in shown) + " |", "|---|" + "---|" * len(shown)]
    for name in order:
        lines.append(f"| {name} | " + " | ".join(
            f"{entrants[name][m]['seed_std'] * _scale(m)[0]:.{_scale(m)[1]}f}"
            for m in shown) + " |")
    lines.append("")
    groups = sorted({g for n in order for g in entrants[n]["groups"]})
    for metric in ("rouge_l", "exact_match"):
        columns = sorted({g.split("/", 1)[1] for g in groups if g.startswith(f"{metric}/")})
        if not columns:
            continue
        lines += [f"## {METRICS[metric].label} per task and language (mean over seeds, %)", "",
                  "| entrant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
        for name in order:
            got = entrants[name]["groups"]
            lines.append(f"| {name} | " + " | ".join(
                f"{got[f'{metric}/{c}'] * 100:.1f}" if f"{metric}/{c}" in got else "-" for c in columns) + " |")
        lines.append("")
    where = results.get("machine")
    lines += [f"## Cost (mean over seeds{f'; {where}' if where else ''})", "",
              "Wall time of training alone (the held-out judging is not counted); peak resident memory of the "
              "run's process.", "", "| entrant | wall s | tokens/s | peak RSS MiB |", "|---|---|---|---|"]
    lines += [f"| {n} | {entrants[n]['wall_s'][0]:.1f} | {entrants[n]['tokens_per_s'][0]:.0f} | "
              f"{entrants[n]['peak_rss_mib'][0]:.0f} |" for n in order]
    resumed = sorted({f"{r['entrant']} seed {r['seed']}" for r in results["runs"] if r.get("resumed")})
    if resumed:
        lines += ["", f"Resumed after an interruption, so their wall time is that of the last attempt only: "
                      f"{', '.join(resumed)}."]
    return "\n".join(lines) + "\n"


def write_plots(plan: Plan, results: dict) -> None:
    try:
        import matplotlib
    except ImportError:
        return  # the report and results files are complete without them (distillzoo[plot] draws them)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distillzoo.compare.plots import colours, read_curves

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

    entrants = results["summary"]["entrants"]
    panels = [(m, METRICS[m].label, _scale(m)[0]) for m in ("rouge_l", "exact_match", "nll", "fkl")
              if m in entrants[names[0]]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.8), squeeze=False)
    for ax, (key, label, scale) in zip(axes[0], panels):
        means = [entrants[n][key]["mean"] * scale for n in names]
        errors = [[(entrants[n][key]["mean"] - entrants[n][key]["lo"]) * scale for n in names],
                  [(entrants[n][key]["hi"] - entrants[n][key]["mean"]) * scale for n in names]]
        bars = ax.bar(range(len(names)), means, yerr=errors, capsize=4, color=[colors[n] for n in names])
        fmt = "{:.1f}" if scale == 100 else "{:.2f}"
        ax.bar_label(bars, labels=[fmt.format(m) for m in means], fontsize=7, padding=2)  # readable when one towers
        top = max(m + e for m, e in zip(means, errors[1]))
        ax.set_ylim(0, max(top, 1.0 if scale == 100 else 1e-9) * 1.15)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_ylabel(f"held-out {label}" + (" (%)" if scale == 100 else ""))
        ax.set_title(f"{label}: mean, 95% interval over prompts", fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(plan.out / "bars.png", dpi=120)
    plt.close(fig)
