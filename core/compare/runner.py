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
:mod:`distillzoo.compare.forkserver`), under ``output_dir/runs/ENTRANT/seedS-lrLR`` (its own
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

import json
import time
from pathlib import Path

import yaml

from distillzoo.atomic import write_text_atomically
from distillzoo.compare.forkserver import ForkServer
from distillzoo.compare.plan import Entrant, Plan, load_plan, run_config, run_dir
from distillzoo.compare.report import machine, report, summarise, write_csv, write_plots
from distillzoo.config import load_config
from distillzoo.errors import DistillzooError

#: what the fork server imports and loads once, so that each run's child starts with it
PRELOAD = ["distillzoo.compare.runner:warm"]


def warm() -> None:
    """Import the trainer, the judge and every plugin, and load the tokenizer (in the fork server)."""
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (the tiny and Qwen models' code)

    from distillzoo.teacher import evaluation  # noqa: F401
    from distillzoo.training import loop  # noqa: F401
    from distillzoo.hooks.manager import algorithm_specs, components
    from distillzoo.objectives.registry import objective_specs
    from distillzoo.data.tokenizer import load_tokenizer

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

    from distillzoo.training.run_dir import RunDir
    from distillzoo.training.loop import train as train_run

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
        from distillzoo.models.causal_lm import model_from_config
        from distillzoo.data.tokenizer import load_tokenizer

        self.tokenizer, self.system = load_tokenizer(cfg.data.tokenizer), cfg.data.system  # as the run tokenizes
        self.teacher = model_from_config(cfg.teacher, "teacher").eval()

    def __call__(self, student_dir: Path, split: dict) -> dict:
        """Greedy exact match (overall, and per task where records have one), then NLL and forward KL,
        reverse KL and TVD per response token in one fused pass."""
        from distillzoo.models.causal_lm import load_causal_lm
        from distillzoo.teacher.evaluation import exact_match, instruction_records, response_divergences
        from distillzoo.data.shards import ConversationDataset

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
        code = server.run("distillzoo.compare.runner:run_child", {"directory": str(directory), "train": cost is None,
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
               "summary": summarise(rows, [e.name for e in plan.entrants]), "machine": machine()}
    write_text_atomically(plan.out / "results.json", json.dumps(results, indent=1) + "\n")
    write_csv(plan.out / "results.csv", rows)
    write_text_atomically(plan.out / "report.md", report(plan, results))
    write_plots(plan, results)
    return results
