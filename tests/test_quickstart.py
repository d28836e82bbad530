"""examples/quickstart.py end to end on a tiny budget: three runs, then the held-out table."""

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_trains_three_models_and_prints_their_held_out_scores(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--out", str(tmp_path),
                           "--teacher-steps", "3", "--student-steps", "2", "--no-progress"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {}
    for name in ("teacher (ce)", "student, distilled (fkl)", "student, ce only"):
        line = next(line for line in done.stdout.splitlines() if line.startswith(name))
        params, _, em, nll, _, kl = re.match(r".{26}\s+([\d.]+)M\s+([\d.]+)%\s+([\d.]+)%\s+([\d.]+)\s+([\d.]+)%"
                                             r"\s+([\d.]+)", line).groups()
        rows[name] = float(params), float(em), float(nll), float(kl)
    assert rows["teacher (ce)"][3] == 0.0 and rows["student, ce only"][3] > 0
    assert rows["teacher (ce)"][0] > rows["student, distilled (fkl)"][0] == rows["student, ce only"][0]
    for run in ("teacher", "student-fkl", "student-ce"):
        assert (tmp_path / run / "final" / "config.json").is_file()
    fkl, ce = ([json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
               for run in ("student-fkl", "student-ce"))
    assert [r["tokens"] for r in fkl] == [r["tokens"] for r in ce]  # the same batches: a like-for-like budget
    assert "$ distillzoo train configs/quickstart.yaml" in done.stdout
    written = json.loads((tmp_path / "results.json").read_text())["models"]
    for name, (params, em, nll, kl) in rows.items():  # the file holds what the table printed
        assert (round(written[name]["exact_match"] * 100, 1), round(written[name]["nll"], 3),
                round(written[name]["fkl"], 3)) == (em, nll, kl)
        assert round(written[name]["params"] / 1e6, 1) == params
        assert next(l for l in done.stdout.splitlines() if l.startswith(name)) in (tmp_path / "results.md").read_text()
    assert "Warning" not in done.stdout + done.stderr, "library warnings in the quickstart's output"
    for noise in ("Loading weights", "Writing model shards", "FutureWarning"):  # transformers' bars, peft's warnings
        assert noise not in done.stdout + done.stderr, f"{noise!r} in the quickstart's output"
    assert done.stderr == "", "--no-progress: nothing on stderr"
