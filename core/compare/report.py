"""What a comparison writes: the per-entrant summary (mean ± std over seeds, ranks), results.csv, report.md
and the plots (held-out NLL curves, exact match and KL bars)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from distillzoo.atomic import write_text_atomically
from distillzoo.compare.plan import METRICS, SHOWN, Plan, run_dir

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
    where = results.get("machine")
    lines += [f"## Cost (mean over seeds{f'; {where}' if where else ''})", "",
              "Wall time of training alone (the held-out judging is not counted); peak resident memory of the "
              "run's process.", "", "| entrant | wall s | tokens/s | peak RSS MiB |", "|---|---|---|---|"]
    lines += [f"| {n} | {summary[n]['wall_s'][0]:.1f} | {summary[n]['tokens_per_s'][0]:.0f} | "
              f"{summary[n]['peak_rss_mib'][0]:.0f} |" for n in order]
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
