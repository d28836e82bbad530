"""Markdown tables from a pytest-benchmark JSON file: python bench/summarize.py FILE.

One table per benchmark (fused linear, logit level, token log-probs), each case's
providers side by side, with the time ratio to distillzoo's fastest provider.
"""

import json
import sys
from collections import defaultdict


def case_of(bench):
    params = dict(bench["params"])
    params.pop("provider", None)
    name = params.pop("name", None)
    shape = "x".join(map(str, params.pop("shape")))
    return (name + " " if name else "") + shape


def main(path):
    data = json.load(open(path))
    groups = defaultdict(lambda: defaultdict(list))
    for b in data["benchmarks"]:
        test = b["name"].split("[")[0]
        groups[test][case_of(b)].append(b)
    first = data["benchmarks"][0]["extra_info"]
    print(f"device: {first.get('device')}; {first.get('dtype')}; torch {first.get('torch')}\n")
    for test, cases in groups.items():
        print(f"### {test}\n")
        print("| case | provider | mean ms | fraction of limit | peak extra MiB | time / distillzoo |")
        print("|---|---|---|---|---|---|")
        for case, benches in cases.items():
            ours = [b["stats"]["mean"] for b in benches if b["params"]["provider"].startswith("distillzoo")]
            best = min(ours) if ours else None
            for b in benches:
                e, mean = b["extra_info"], b["stats"]["mean"]
                ratio = f"{mean / best:.2f}" if best else ""
                print(f"| {case} | {b['params']['provider']} | {mean * 1e3:.1f} | {e.get('fraction_of_limit')} | "
                      f"{e.get('peak_extra_mib')} | {ratio} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
