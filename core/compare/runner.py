"""``distillzoo compare CONFIG``: entrants trained under one budget, judged on metrics none of them trains on.

::

    base:                        # a train config without an objective, shared by every entrant
      student: {tiny: {hidden_size: 32, num_layers: 2}}
      teacher: {path: runs/quickstart/teacher/final}   # given once, shared, and the judge of the divergences
      data: {streams: [{name: tasks, path: data/quickstart/train.jsonl, format: chat, repeat: 1}], max_length: 64}
      train: {steps: 200, batch_size: 16, lr: 3.0e-3, warmup_steps: 10, log_every: 10, eval_every: 50}
    held_out: {path: data/quickstart/eval.jsonl, format: chat}     # what the report is on
    decoding: {samples: 1, temperature: 0.0}                       # how the judged answers are drawn
    validation: {path: data/val.jsonl, format: chat}               # what a learning-rate grid is tuned on
    entrants:
      - {name: fkl, objective: {name: fkl}}
      - {name: ce+fkl, objectives: [{name: ce, weight: 0.5}, {name: fkl, weight: 0.5}]}
      - {name: abkd, objective: {name: abkd, alpha: 0.5}, lr: [1.0e-3, 3.0e-3]}   # a plugin's, by name
    seeds: [0, 1, 2]
    lr_grid: null                # a grid for every entrant that gives none
    serve_teacher: null          # {top_k: 16, port: 8765}: base.teacher served once, every entrant on its top-k
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
* the held-out metrics are no entrant's own objective alone (:mod:`distillzoo.compare.judge`):
  ROUGE-L, exact match and length of each student's answers (drawn as the config's
  ``decoding`` says: one greedy answer per prompt by default), NLL per response token, and
  top-1 agreement, forward KL, reverse KL and TVD against the teacher, teacher-forced on the
  references; overall, per task and per language, and prompt by prompt.

Each run is the ``distillzoo train`` loop in a child forked from a fork server (one
process that imported torch, transformers and the plugins once; see
:mod:`distillzoo.compare.forkserver`), under ``output_dir/runs/ENTRANT/seedS-lrLR`` (its own
metrics.jsonl and checkpoints), so its wall time and peak resident memory are its
own and a run that crashes takes no other with it (``LR`` as
:func:`~distillzoo.compare.plan.lr_name` writes it: ``0.003``, ``1e-05``, and never one name
for two rates). The same child then judges the run.

A rerun reuses what is done, and only what was done under this config:

* each run directory holds ``definition.json`` (its train config, resolved, and its sha256;
  see :mod:`distillzoo.compare.plan`), written when the run starts. Before anything trains,
  a run directory of another definition (``train.steps: 4 -> 8``), or of none (an older
  layout), is refused naming it and the keys that differ: give the new config a new
  output_dir, or delete that run directory to retrain it. Nothing is deleted for you. A new
  entrant, seed or rate is a new run directory;
* a run with its definition, a final student and a ``cost.json`` is not trained again (a run
  stopped between its final save and its cost is trained again from scratch, so that its
  cost is measured; one stopped mid-way resumes from its checkpoint);
* ``result.json`` holds ``{SPLIT: {...metrics, "split": {path, format, columns, sha256}}}``:
  each judgement with the content key of the split it judged (the sha256 of the file, or of
  the files under a directory) and the decoding. A split whose key differs from the split's now (another
  file, or the same file edited) is judged again; judging is derived data.

So rerunning an interrupted comparison finishes it and gives the same report.
Written to ``output_dir``: results.csv and results.json (one row per run, and the summary),
report.md (:mod:`distillzoo.compare.report`: means with 95% paired bootstrap intervals,
pairwise sign-flip tests with Holm's correction, ranks with ties, what the table supports in
words, the seed spread, per task and language; then wall time, tokens/s and peak memory),
curves.png and bars.png.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import yaml

from distillzoo.atomic import write_text_atomically
from distillzoo.compare.forkserver import ForkServer
from distillzoo.compare.plan import (Entrant, Plan, check_runs, load_plan, lr_name, run_config, run_definition,
                                     run_dir, split_key)
from distillzoo.compare.report import machine, report, summarise, write_csv, write_plots
from distillzoo.config import load_config
from distillzoo.errors import DistillzooError

#: what the fork server imports and loads once, so that each run's child starts with it
PRELOAD = ["distillzoo.compare.runner:warm"]


def warm() -> None:
    """Import the trainer, the judge and every plugin, and load the tokenizer (in the fork server)."""
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (the tiny and Qwen models' code)

    from distillzoo.compare import judge  # noqa: F401  (and through it the evaluation and ROUGE-L)
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


def run_child(directory: str, train: bool, splits: dict[str, dict], decoding: dict | None = None,
              teacher: dict | None = None) -> None:
    """In a forked child: train the run ``directory/compare_run.yaml`` describes (if ``train``), then
    judge its final student on each of ``splits`` ({name: {path, format}}), adding to result.json each
    judgement with the key (:func:`~distillzoo.compare.plan.split_key`) of the content it judged.

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
        from distillzoo.compare.judge import Judge
        from distillzoo.teacher.evaluation import Decoding

        judge = Judge(cfg, Decoding(**(decoding or {})), teacher)
        done = _read_json(directory / "result.json") or {}
        for name, split in splits.items():
            key = {**split_key(split, name), "decoding": decoding or {}}  # the bytes the judge is about to read
            done[name] = {**judge(directory / "final", split), "split": key}
            write_text_atomically(directory / "result.json", json.dumps(done, indent=1) + "\n")


def _judged(done: dict, keys: dict[str, dict]) -> dict:
    """The judgements of ``done`` (a result.json) of the splits as they are now (their key is in ``keys``)."""
    return {s: result for s, result in done.items()
            if isinstance(result, dict) and s in keys and result.get("split") == keys[s]}


def _result(plan: Plan, server: ForkServer, entrant: Entrant, seed: int, lr: float, splits: tuple[str, ...],
            keys: dict[str, dict], say) -> dict:
    """One run's row: trained if it has no final student and cost yet, judged on the ``splits`` its
    result.json has no judgement of under their current ``keys`` (:func:`split_key`), both in one forked
    child. :func:`check_runs` has made sure the directory holds no run of another definition."""
    directory = run_dir(plan, entrant, seed, lr)
    finished = (directory / "final").is_dir()
    cost = _read_json(directory / "cost.json") if finished else None
    if cost is None:
        directory.mkdir(parents=True, exist_ok=True)
        write_text_atomically(directory / "definition.json",
                              json.dumps(run_definition(plan, entrant, seed, lr), indent=1) + "\n")
        (directory / "result.json").unlink(missing_ok=True)  # it judged a student this run replaces
        cfg = run_config(plan, entrant, seed, lr)
        if finished:
            cfg["resume"] = "never"  # trained, but stopped before its cost was written: measure it again
        write_text_atomically(directory / "compare_run.yaml", yaml.safe_dump(cfg, sort_keys=False))
        say(f"train {entrant.name} seed {seed} lr {lr_name(lr)}")
    done = _judged(_read_json(directory / "result.json") or {}, keys)
    todo = {s: plan.held_out if s == "held_out" else plan.validation for s in splits if s not in done}
    if cost is None or todo:
        log = directory / ("train.log" if cost is None else "judge.log")
        code = server.run("distillzoo.compare.runner:run_child", {
            "directory": str(directory), "train": cost is None, "splits": todo, "decoding": plan.decoding,
            "teacher": plan.base["teacher"] if plan.serve_teacher is not None else None}, log)
        if code != 0:
            tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
            raise DistillzooError(f"compare: run {directory} failed (exit {code}); its log ends:\n{tail}")
        cost, done = _read_json(directory / "cost.json"), _judged(_read_json(directory / "result.json") or {}, keys)
        changed = [plan.held_out["path"] if s == "held_out" else plan.validation["path"] for s in todo if s not in done]
        if changed:  # judged, but on other bytes than the ones this comparison keyed (and keyed the others by)
            raise DistillzooError(f"compare: {changed[0]} changed while the comparison ran (run {directory} judged "
                                  "other content than the other runs); run compare again to judge every run on it")
    return {"entrant": entrant.name, "seed": seed, "lr": lr, **cost,
            **{f"{s}/{k}": v for s in done for k, v in done[s].items() if k != "split"}}


@contextlib.contextmanager
def served_teacher(plan: Plan, say):
    """With ``serve_teacher``: base.teacher behind one ``distillzoo serve`` at ``plan.teacher_url`` while the runs
    train (a tiny teacher is saved under output_dir/served-teacher first); otherwise nothing."""
    if plan.serve_teacher is None or all((run_dir(plan, e, s, lr) / "cost.json").exists()
                                         for e in plan.entrants for lr in e.lrs for s in plan.seeds):
        yield
        return
    import subprocess
    import sys
    import urllib.request

    from distillzoo.compare.plan import served_name

    teacher = plan.base["teacher"]
    model_dir = teacher.get("path")
    if model_dir is None:
        from distillzoo.config import ModelConfig
        from distillzoo.models.causal_lm import model_from_config

        model_dir = plan.out / "served-teacher"
        model_from_config(ModelConfig(**teacher), "teacher").save_pretrained(model_dir)
    log = plan.out / "served-teacher.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as sink:
        process = subprocess.Popen([sys.executable, "-m", "distillzoo", "serve", str(model_dir), "--port",
                                    str(plan.serve_teacher["port"]), "--served-model-name", served_name(plan)],
                                   stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(1200):
            answered = False
            try:
                urllib.request.urlopen(plan.teacher_url + "/v1/models", timeout=1).read()
                answered = True
            except OSError:
                time.sleep(0.1)
            if process.poll() is not None:  # exited: it could not bind, or failed to load
                raise DistillzooError(f"compare: serve_teacher: distillzoo serve at {plan.teacher_url} exited (port "
                                      f"{plan.serve_teacher['port']} in use?); its log ends: "
                                      f"{log.read_text(encoding='utf-8', errors='replace')[-2000:]}")
            if answered and f"serving {served_name(plan)} " in log.read_text(encoding="utf-8", errors="replace"):
                break  # our server, up (another one on the port would have made ours exit)
        else:
            raise DistillzooError(f"compare: serve_teacher: distillzoo serve did not answer at {plan.teacher_url}")
        say(f"serving the teacher at {plan.teacher_url} for every entrant")
        yield
    finally:
        process.terminate()
        process.wait(timeout=60)


def compare(path: str | Path, say=print) -> dict:
    """Run (or finish) the comparison ``path`` describes; writes and returns the results."""
    plan = load_plan(path)
    check_runs(plan)  # no run of another config is reused (or touched), before anything trains
    # what every judgement of this comparison is keyed by: the splits' content now
    keys = {"held_out": {**split_key(plan.held_out, f"{plan.where}: held_out"), "decoding": plan.decoding}}
    if any(len(e.lrs) > 1 for e in plan.entrants):
        keys["validation"] = {**split_key(plan.validation, f"{plan.where}: validation"), "decoding": plan.decoding}
    plan.out.mkdir(parents=True, exist_ok=True)
    rows, chosen = [], {}
    with ForkServer(PRELOAD) as server, served_teacher(plan, say):  # each started when first needed
        for e in plan.entrants:
            if len(e.lrs) > 1:  # tuned on the first seed, on the validation split
                tuning = [_result(plan, server, e, plan.seeds[0], lr, ("validation",), keys, say) for lr in e.lrs]
                chosen[e.name] = min(tuning, key=lambda r: r["validation/nll"])["lr"]
                rows += [{**r, "tuning": True} for r in tuning if r["lr"] != chosen[e.name]]
            else:
                chosen[e.name] = e.lrs[0]
            for seed in plan.seeds:
                rows.append({**_result(plan, server, e, seed, chosen[e.name], ("held_out",), keys, say),
                             "tuning": False})
    from distillzoo.teacher.evaluation import Decoding

    summary = summarise(rows, [e.name for e in plan.entrants])  # from every run's per-prompt scores
    rows = [{k: v for k, v in r.items() if not k.endswith("/prompts")} for r in rows]  # those stay in result.json
    results = {"config": str(path), "output_dir": str(plan.out), "seeds": plan.seeds, "chosen_lr": chosen,
               "held_out": keys["held_out"], "decoding": Decoding(**plan.decoding).words, "runs": rows,
               "summary": summary, "machine": machine()}
    write_text_atomically(plan.out / "results.json", json.dumps(results, indent=1) + "\n")
    write_csv(plan.out / "results.csv", rows)
    write_text_atomically(plan.out / "report.md", report(plan, results))
    write_plots(plan, results)
    return results
