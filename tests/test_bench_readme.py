"""bench/README.md's tables are what bench/summarize.py generates from the committed bench/results/."""

import importlib.util
import re
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"


def summarize():
    spec = importlib.util.spec_from_file_location("bench_summarize", BENCH / "summarize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_tables_are_generated_from_the_results_files():
    readme = (BENCH / "README.md").read_text()
    assert summarize().render_readme(readme) == readme, (
        "bench/README.md's generated regions differ from bench/results/: run python bench/summarize.py --write-readme")


def test_every_results_file_is_shown_and_every_linked_one_exists():
    readme = (BENCH / "README.md").read_text()
    shown = {args[1] for args in summarize().regions(readme)}
    assert shown == {p.name for p in (BENCH / "results").glob("*.json")}
    for link in re.findall(r"\]\((results/[^)#]+)\)", readme):
        assert (BENCH / link).exists(), f"bench/README.md links {link}, which does not exist"
