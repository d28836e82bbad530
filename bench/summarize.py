"""Markdown tables from pytest-benchmark results, and the generated tables of bench/README.md.

    python bench/summarize.py FILE [FILE ...]    # every benchmark of each file, providers side by side
    python bench/summarize.py --write-readme     # rewrite the generated regions of bench/README.md
    python bench/summarize.py --check            # exit 1 when bench/README.md is not what they generate

A generated region of bench/README.md is the text between

    <!-- generated: VIEW FILE [TEST ...] -->
    <!-- end generated -->

where VIEW is one of :data:`VIEWS`, FILE a results file in bench/results/, and TEST
optionally limits ``providers`` to those tests. Each region opens with where the
figures come from, read from the file: the machine (``machine_info``), the date
(``datetime``), the commit and the command that reproduces the run (``command``,
recorded by bench/conftest.py; for a file without it, the pytest command that runs
the benchmarks it holds). Everything outside the regions is written by hand.
tests/test_bench_readme.py checks that the committed README equals what the
committed results generate.
"""

import argparse
import json
import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
README = BENCH / "README.md"

BEGIN = re.compile(r"^<!-- generated: (?P<args>[^>]*?) -->$")
END = "<!-- end generated -->"

# extra_info keys shown as columns where a test's benchmarks carry them: key -> (header, format)
EXTRA_COLUMNS = {
    "scored_tokens": ("scored tokens", lambda v: f"{v}"),
    "logits_mib_fp32": ("their fp32 logits, MiB", lambda v: f"{v:.1f}"),
    "fraction_of_limit": ("fraction of limit", lambda v: f"{v}"),
    "peak_extra_mib": ("peak extra MiB", lambda v: f"{v:.1f}"),
    "tokens_per_s": ("tokens/s", lambda v: f"{v:.1f}"),
    "loss_after": ("loss after the timed steps", lambda v: f"{v}"),
    "loss_curve": ("loss curve (3 fresh steps)", lambda v: ", ".join(map(str, v))),
}
DTYPES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16"}


# ---------------------------------------------------------------- reading a results file

def load(name):
    path = RESULTS / name
    if not path.is_file():
        raise SystemExit(f"bench/README.md names bench/results/{name}, which does not exist")
    return json.loads(path.read_text())


def provider_of(bench):
    return bench["params"].get("provider")


def case_of(bench):
    """The benchmark's parameter id without its provider, e.g. ``N512-Hs256-Ht512-V151936`` or ``fkl-N256-V151936``."""
    param, provider = bench.get("param") or "", provider_of(bench)
    if provider and param == provider:
        return "-"
    if provider and param.startswith(provider + "-"):
        return param[len(provider) + 1:]
    if provider and ("-" + provider) in param:
        return param.replace("-" + provider, "", 1)
    return param


def test_of(bench):
    return bench["name"].split("[")[0]


def module_of(bench):
    return bench["fullname"].split("::")[0]


def by_test_and_case(data, tests=()):
    groups = defaultdict(lambda: defaultdict(list))
    for b in data["benchmarks"]:
        if not tests or test_of(b) in tests:
            groups[test_of(b)][case_of(b)].append(b)
    return groups


def find(data, test, case, provider):
    for b in data["benchmarks"]:
        if test_of(b) == test and case_of(b) == case and provider_of(b) == provider:
            return b
    return None


def mean_ms(bench):
    return bench["stats"]["mean"] * 1e3


def ms(value):
    """Milliseconds to three significant figures or whole ms, whichever is shorter."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


# ---------------------------------------------------------------- where the figures come from

def values(data, key):
    seen = []
    for b in data["benchmarks"]:
        v = b["extra_info"].get(key)
        if v is not None and v not in seen:
            seen.append(v)
    return seen


def command_of(data, name):
    """The recorded command, or the one that runs the benchmarks the file holds (and says so)."""
    if data.get("command"):
        return f"`{data['command']}`"
    modules = []
    for b in data["benchmarks"]:
        if module_of(b) not in modules:
            modules.append(module_of(b))
    return (f"`pytest {' '.join(modules)} --benchmark-only --benchmark-json bench/results/{name}` "
            "(the file does not record its command: this one runs the benchmarks it holds)")


def provenance(data, name):
    """Machine, date, commit and command of one results file, as a few markdown lines."""
    info, cpu = data["machine_info"], data["machine_info"].get("cpu", {})
    devices = values(data, "device")
    avx = "AVX-512" if "avx512f" in cpu.get("flags", []) else "no AVX-512"
    host = (f"{cpu.get('brand_raw', 'unknown CPU')}, {cpu.get('count')} cores "
            f"(family {cpu.get('family')}, model {cpu.get('model')}; {avx})")
    gpus = [d for d in devices if not str(d).startswith("cpu")]
    machine = f"{', '.join(gpus)}; host {host}" if gpus else host

    software = []
    torch = info.get("packages", {}).get("torch") or ", ".join(values(data, "torch"))
    software.append(f"torch {torch}" if torch else "torch version not recorded")
    threads = info.get("torch_threads") or ", ".join(map(str, values(data, "threads")))
    if values(data, "threads_per_process"):
        software.append("torch threads per process as in the table")
    elif threads:
        software.append(f"{threads} torch threads")
    elif not gpus:
        software.append("torch threads not recorded")
    dtypes = list(dict.fromkeys(DTYPES.get(d, d) for d in values(data, "dtype")))
    if dtypes:
        software.append(", ".join(dtypes))
    software.append(f"Python {info.get('python_version')}")
    packages = {k: v for k, v in info.get("packages", {}).items() if k != "torch"}
    software += [f"{k} {v}" for k, v in packages.items()]

    when = datetime.fromisoformat(data["datetime"]).strftime("%Y-%m-%d %H:%M UTC")
    commit = data.get("commit_info", {})
    at = f"commit {commit['id'][:7]}" if re.fullmatch(r"[0-9a-f]{40}", commit.get("id", "")) else "commit not recorded"
    if commit.get("dirty"):
        at += " with uncommitted changes"
    return (f"Machine: {machine}; {', '.join(software)}.  \n"
            f"Run: {when}, {at}; results [`results/{name}`](results/{name}).  \n"
            f"Command: {command_of(data, name)}")


# ---------------------------------------------------------------- views

def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def providers(data, name, *tests):
    """Per test, every case's providers side by side: time, the extra_info columns it has, time over distillzoo's best."""
    out = []
    for test, cases in by_test_and_case(data, tests).items():
        benches = [b for group in cases.values() for b in group]
        extra = [k for k in EXTRA_COLUMNS if any(k in b["extra_info"] for b in benches)]
        header = ["case", "provider", "mean ms", *(EXTRA_COLUMNS[k][0] for k in extra), "time / distillzoo"]
        rows = []
        for case, group in cases.items():
            ours = [b["stats"]["mean"] for b in group if provider_of(b).startswith("distillzoo")]
            best = min(ours) if ours else None
            for b in group:
                e = b["extra_info"]
                cells = [EXTRA_COLUMNS[k][1](e[k]) if e.get(k) is not None else "" for k in extra]
                ratio = f"{b['stats']['mean'] / best:.2f}" if best else ""
                rows.append([case, provider_of(b), f"{mean_ms(b):.1f}", *cells, ratio])
        out.append(f"#### {test}\n\n{table(header, rows)}")
    return "\n\n".join(out)


class Goal:
    """One goal: ``ours`` against ``peer`` (or against its limit when peer is None) on one quantity."""

    def __init__(self, test, what, quantity, ours, peer, bound, peer_text="", bound_text=None):
        self.test, self.what, self.quantity, self.ours, self.peer = test, what, quantity, ours, peer
        self.bound, self.peer_text = bound, peer_text
        self.bound_text = bound_text or (f"{bound:.0%}" if quantity == "memory" else f"{bound}")

    def text(self, case):
        what = f"{self.what} ({case})"
        if self.quantity == "time":
            return f"{what}: time <= {self.bound_text}x {self.peer_text}"
        if self.quantity == "speedup":
            return f"{what}: >= {self.bound_text}x faster than {self.peer_text}"
        if self.quantity == "memory":
            return f"{what}: peak extra memory <= {self.bound_text} of {self.peer_text}"
        if self.quantity == "lower-memory":
            return f"{what}: lower peak extra memory than {self.peer_text}"
        if self.quantity == "limit":
            return f"{what}: >= {self.bound_text} of {self.peer_text}"
        if self.quantity == "curves":
            return f"{what}: every provider's loss curve equal to {self.peer_text}'s (relative {self.bound_text})"
        return f"{what}: {self.peer_text}"

    def measure(self, data, case):
        """(measured, met) for one case, or None where the file lacks a provider."""
        a = find(data, self.test, case, self.ours)
        b = find(data, self.test, case, self.peer) if self.peer else None
        if a is None or (self.peer and b is None):
            return None
        ta, ea = mean_ms(a), a["extra_info"]
        if self.quantity in ("time", "speedup", "info"):
            tb = mean_ms(b)
            if self.quantity == "speedup":
                return f"{ms(ta)} ms vs {ms(tb)} ms: {tb / ta:.2f}x", tb / ta >= self.bound
            met = ta / tb <= self.bound if self.quantity == "time" else None
            return f"{ms(ta)} ms vs {ms(tb)} ms: {ta / tb:.2f}x", met
        if self.quantity in ("memory", "lower-memory"):
            ma, mb = ea["peak_extra_mib"], b["extra_info"]["peak_extra_mib"]
            bound = self.bound if self.quantity == "memory" else 1.0
            share = f"{ma / mb:.1%}" if self.quantity == "memory" else f"{ma / mb:.2f}x"
            return f"{ma:.0f} MiB vs {mb:.0f} MiB: {share}", ma / mb <= bound if self.quantity == "memory" else ma < mb
        if self.quantity == "limit":
            return f"{ea['fraction_of_limit']}", ea["fraction_of_limit"] >= self.bound
        if self.quantity == "curves":
            group = [x for x in data["benchmarks"] if test_of(x) == self.test and case_of(x) == case]
            want = a["extra_info"]["hf_loop_curve"]
            ok = all(abs(g - w) <= self.bound * abs(w)
                     for x in group for g, w in zip(x["extra_info"]["loss_curve"], want))
            return f"{len(group)} providers; {self.peer_text}: {', '.join(map(str, want))}", ok
        raise ValueError(self.quantity)


CPU_GOALS = [
    Goal("test_fkl_from_hidden_fwd_bwd", "fused fkl `fkl.from_hidden`", "time", "distillzoo-torch", "naive-torch", 1.0,
         "the naive path"),
    Goal("test_fkl_from_hidden_fwd_bwd", "fused fkl `fkl.from_hidden`", "time", "distillzoo-torch",
         "liger-chunked-jsd", 0.8, "Liger's `LigerFusedLinearJSDLoss` (beta 0)"),
    Goal("test_fkl_from_hidden_fwd_bwd", "fused fkl `fkl.from_hidden`", "memory", "distillzoo-torch", "naive-torch",
         0.15, "the naive path's"),
    Goal("test_token_logprobs_fwd_bwd", "`token_logprobs`", "time", "distillzoo-torch", "torch-linear-cross-entropy",
         1.0, "`F.linear_cross_entropy`"),
    Goal("test_token_logprobs_fwd_bwd", "`token_logprobs`", "memory", "distillzoo-torch",
         "torch-linear-cross-entropy", 0.5, "`F.linear_cross_entropy`'s"),
    Goal("test_token_logprobs_fwd_bwd", "`ce.from_hidden(reduction=\"sum\")`", "info", "distillzoo-ce-sum",
         "torch-linear-cross-entropy", None, "the scalar loss `F.linear_cross_entropy` computes, for comparison"),
    Goal("test_kd_train_step", "KD training step", "speedup", "distillzoo-train-step", "trl-gkd", 3.0,
         "TRL's `GKDTrainer`"),
    Goal("test_kd_train_step", "KD training step", "memory", "distillzoo-train-step", "trl-gkd", 1 / 3,
         "`GKDTrainer`'s", bound_text="1/3"),
    Goal("test_kd_train_step", "KD training step", "curves", "distillzoo-train-step", None, 1e-4, "the plain loop",
         bound_text="1e-4"),
]
GPU_GOALS = [
    Goal("test_fkl_from_hidden_fwd_bwd", "fused fkl", "speedup", "distillzoo-triton", "liger-chunked-jsd", 1.5,
         "Liger's `LigerFusedLinearJSDLoss`"),
    Goal("test_fkl_from_hidden_fwd_bwd", "fused fkl", "lower-memory", "distillzoo-triton", "liger-chunked-jsd", None,
         "`LigerFusedLinearJSDLoss`"),
    Goal("test_fkl_from_hidden_fwd_bwd", "fused fkl", "limit", "distillzoo-triton", None, 0.8,
         "the matmul bound (fraction of limit)"),
    Goal("test_logit_objective_fwd_bwd", "logit kernel", "limit", "distillzoo-triton", None, 0.8,
         "copy bandwidth on the minimal bytes (fraction of limit)"),
]


def goals_table(data, goals):
    rows = []
    for goal in goals:
        cases = [c for c in by_test_and_case(data, (goal.test,)).get(goal.test, {})]
        for case in cases:
            measured = goal.measure(data, case)
            if measured is None:
                continue
            value, met = measured
            rows.append([goal.text(case), value, "-" if met is None else ("yes" if met else "no")])
    return table(["goal", "measured", "met"], rows)


def cpu_goals(data, name):
    """The CPU goals against one run of the fused-head and training-step benchmarks."""
    return goals_table(data, CPU_GOALS)


def gpu_goals(data, name):
    """The GPU goals against one GPU run of the kernel benchmarks."""
    return goals_table(data, GPU_GOALS)


def scaling(data, name):
    """Fused against naive per case of test_bench_scaling, and a summary line."""
    rows, ratios, fused_peaks, naive_peaks, dws = [], [], [], [], []
    for case, group in by_test_and_case(data, ("test_fkl_scaling",))["test_fkl_scaling"].items():
        fused = next(b for b in group if provider_of(b).startswith("distillzoo"))
        naive = next((b for b in group if provider_of(b) == "naive-torch"), None)
        fe = fused["extra_info"]
        n, hs, ht, v = fe["shape"]
        cells = [fe["dimension"].replace("_", " "), str(n), str(hs), str(ht), str(v), f"{mean_ms(fused):.0f}"]
        fused_peaks.append(fe["peak_extra_mib"])
        dws.append(fe["dw_mib"])
        if naive:
            ne = naive["extra_info"]
            ratios.append(mean_ms(fused) / mean_ms(naive))
            naive_peaks.append(ne["peak_extra_mib"])
            cells += [f"{mean_ms(naive):.0f}", f"{ratios[-1]:.2f}", f"{fe['us_per_token']:.0f}",
                      f"{fe['peak_extra_mib']:.0f}", f"{ne['peak_extra_mib']:.0f}",
                      f"{fe['peak_extra_mib'] / ne['peak_extra_mib']:.1%}"]
        else:
            cells += ["", "", f"{fe['us_per_token']:.0f}", f"{fe['peak_extra_mib']:.0f}", "", ""]
        rows.append(cells)
    header = ["varied", "N", "Hs", "Ht", "V", "fused ms", "naive ms", "fused / naive time", "fused µs per token",
              "fused peak MiB", "naive peak MiB", "fused / naive memory"]
    faster = sum(r < 1 for r in ratios)
    summary = (f"The fused path took less time than the naive one in {faster} of {len(ratios)} cases "
               f"({min(ratios):.2f}x to {max(ratios):.2f}x). Its peak extra memory was {min(fused_peaks):.0f} to "
               f"{max(fused_peaks):.0f} MiB, of which dW (`[V, Hs]` fp32) is {min(dws):.0f} to {max(dws):.0f} MiB; "
               f"the naive path's was {min(naive_peaks):.0f} to {max(naive_peaks):.0f} MiB.")
    return f"{table(header, rows)}\n\n{summary}"


def cache_teacher(data, name):
    """cache-teacher throughput per process count, and the speed-up over one process."""
    benches = sorted(data["benchmarks"], key=lambda b: b["extra_info"]["processes"])
    base = benches[0]["extra_info"]["tokens_per_s"]
    rows = []
    for b in benches:
        e = b["extra_info"]
        speedup = "" if e["processes"] == benches[0]["extra_info"]["processes"] else f" ({e['tokens_per_s'] / base:.2f}x)"
        rows.append([str(e["processes"]), str(e["threads_per_process"]), f"{e['tokens_per_s']:.0f}{speedup}",
                     f"{e['tokens_per_s_with_startup']:.0f}", f"{e['wall_s']:.1f}", f"{e['startup_s']:.1f}"])
    e = benches[0]["extra_info"]
    header = ["processes", "torch threads each", "response tokens/s", "with start-up", "wall s", "start-up s"]
    return f"{e['samples']:,} records, {e['response_tokens']:,} response tokens.\n\n{table(header, rows)}"


def served_teacher(data, name):
    """Seconds per KD step per teacher provider, and the share of the served teacher's time that prefetch hides."""
    steps = {b["extra_info"]["provider"]: b["extra_info"]["s_per_step"] for b in data["benchmarks"]}
    floor = steps["cache"]
    rows = [[provider, f"{seconds * 1000:.0f}", f"{seconds / floor:.2f}x"] for provider, seconds in steps.items()]
    hidden = (steps["served"] - steps["served-prefetch"]) / (steps["served"] - floor)
    e = data["benchmarks"][0]["extra_info"]
    return (f"Shape (records, student hidden, teacher hidden, teacher layers, batch, steps): {tuple(e['shape'])}; "
            f"top-{e['top_k']}; one torch thread in the training process and one in the server.\n\n"
            f"{table(['teacher', 'ms per step', 'against the cache'], rows)}\n\n"
            f"The served teacher adds {(steps['served'] - floor) * 1000:.0f} ms to a step without prefetch and "
            f"{(steps['served-prefetch'] - floor) * 1000:.0f} ms with it: prefetch hides {hidden:.0%} of the "
            "teacher's time.")


def curate(data, name):
    """Rows/s and peak RSS of each curation tool at each size, and how peak RSS grows from the smallest size."""
    runs = sorted((b["extra_info"] for b in data["benchmarks"]), key=lambda e: (e["tool"], e["rows"]))
    smallest = {}
    rows = []
    for e in runs:
        base = smallest.setdefault(e["tool"], e)
        growth = "" if e is base else f" ({e['peak_rss_mib'] / base['peak_rss_mib']:.2f}x)"
        rows.append([e["tool"], f"{e['rows']:,}", f"{e['rows_per_s']:,.0f}", f"{e['seconds']:.0f}",
                     f"{e['peak_rss_mib']:,.0f}{growth}", f"{e['kept']:,}"])
    header = ["tool", "rows", "rows/s", "seconds", "peak RSS MiB", "rows kept"]
    return table(header, rows)


VIEWS = {"providers": providers, "cpu-goals": cpu_goals, "gpu-goals": gpu_goals, "scaling": scaling,
         "cache-teacher": cache_teacher, "served-teacher": served_teacher, "curate": curate}


def region(args):
    """The generated text of one region: its provenance, then the view."""
    view, name, *rest = args.split()
    if view not in VIEWS:
        raise SystemExit(f"bench/README.md: unknown view {view!r} in '<!-- generated: {args} -->'; "
                         f"views: {', '.join(VIEWS)}")
    data = load(name)
    return f"{provenance(data, name)}\n\n{VIEWS[view](data, name, *rest)}"


def render_readme(text):
    """``text`` with every generated region rewritten from bench/results/."""
    out, lines, i = [], text.split("\n"), 0
    while i < len(lines):
        out.append(lines[i])
        match = BEGIN.match(lines[i])
        i += 1
        if not match:
            continue
        end = next((j for j in range(i, len(lines)) if lines[j] == END), None)
        if end is None:
            raise SystemExit(f"bench/README.md:{i}: '{lines[i - 1]}' has no '{END}'")
        out += ["", region(match["args"]), "", END]
        i = end + 1
    return "\n".join(out)


def regions(text):
    """The (view, file, tests) of every generated region of ``text``."""
    return [tuple(m["args"].split()) for line in text.split("\n") if (m := BEGIN.match(line))]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="results files to print as tables")
    parser.add_argument("--write-readme", action="store_true", help="rewrite bench/README.md's generated regions")
    parser.add_argument("--check", action="store_true", help="exit 1 when bench/README.md is out of date")
    args = parser.parse_args(argv)
    if args.write_readme or args.check:
        text = README.read_text()
        fresh = render_readme(text)
        if args.check:
            if fresh != text:
                print("bench/README.md is not what bench/results/ generates: run python bench/summarize.py "
                      "--write-readme", file=sys.stderr)
                return 1
            return 0
        README.write_text(fresh)
        return 0
    if not args.files:
        parser.error("give results files, --write-readme or --check")
    for path in map(Path, args.files):
        data = json.loads(path.read_text())
        print(f"{provenance(data, path.name)}\n\n{providers(data, path.name)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
