"""Print a markdown table from a pytest-benchmark JSON file: python bench/summarize.py FILE."""

import json
import sys


def main(path):
    data = json.load(open(path))
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}; "
          f"{data['benchmarks'][0]['extra_info'].get('device', '')}\n")
    print("| case | provider | mean ms | TFLOP/s | fraction of matmul limit | peak extra MiB |")
    print("|---|---|---|---|---|---|")
    for b in data["benchmarks"]:
        case, provider = b["params"]["shape"], b["params"]["provider"]
        e = b["extra_info"]
        print(f"| {'x'.join(map(str, case))} | {provider} | {b['stats']['mean'] * 1e3:.1f} | {e['tflops']} | "
              f"{e['fraction_of_limit']} | {e['peak_extra_mib']} |")


if __name__ == "__main__":
    main(sys.argv[1])
