"""The ``distillzoo`` command line: list, algorithms, show, plugins, config, check, train, eval, generate,
cache-teacher, score, curate, filter, compare, plot, prepare, reference-cache, serve."""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from typing import Sequence

from distillzoo.errors import ConfigError, DistillzooError


def _columns(args: argparse.Namespace) -> dict | None:
    """``--column FIELD=COLUMN`` (repeatable): the format's field FIELD is the dataset's column COLUMN."""

    columns = {}
    for item in args.column or []:
        field, sep, column = item.partition("=")
        if not sep or not field or not column:
            raise ConfigError(f"--column {item!r}: give FIELD=COLUMN (the format's field, the dataset's column)")
        columns[field] = column
    return columns or None


def _add_columns(p: argparse.ArgumentParser) -> None:
    p.add_argument("--column", action="append", metavar="FIELD=COLUMN",
                   help="the format reads field FIELD from the dataset's column COLUMN (repeatable)")


def _add_placement(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: this rank's GPU under torchrun, "
                                                  "cuda:0 in one process, the CPU without CUDA)")
    p.add_argument("--max-memory", default=None, metavar="gpu=SIZE,cpu=SIZE",
                   help="spread a model bigger than one device: its layers over this rank's GPUs (SIZE each), then "
                        "CPU memory, then disk; embeddings and lm_head stay on the first (needs distillzoo[offload])")


def _cmd_list(args: argparse.Namespace) -> int:
    from distillzoo.listing import objective_listing

    entries = objective_listing()  # imports no torch unless a plugin changed since the last list
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    rows = [("NAME", "KIND", "PACKAGE", "SUMMARY")] + [(e["name"], e["kind"], e["package"], e["summary"])
                                                       for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def _cmd_algorithms(args: argparse.Namespace) -> int:
    from distillzoo.hooks.manager import algorithm_specs

    specs = sorted(algorithm_specs().values(), key=lambda s: s.name)
    if args.json:
        print(json.dumps([s.as_dict() for s in specs], indent=2))
        return 0
    rows = [("NAME", "PACKAGE", "RECORDS", "SUMMARY")] + [(s.name, s.package, s.cls.records, s.summary) for s in specs]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + "  " + r[3])
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from distillzoo.errors import UnknownNameError, did_you_mean
    from distillzoo.hooks.manager import algorithm_specs
    from distillzoo.objectives.registry import objective_specs

    objectives, algorithms = objective_specs(), algorithm_specs()
    if args.name not in objectives and args.name not in algorithms:
        raise UnknownNameError(f"unknown objective or training algorithm {args.name!r}. Objectives: "
                               f"{', '.join(sorted(objectives))}; algorithms: {', '.join(sorted(algorithms))}."
                               + did_you_mean(args.name, [*objectives, *algorithms]))
    found = [s for s in (objectives.get(args.name), algorithms.get(args.name)) if s is not None]
    if args.json:
        print(json.dumps(found[0].as_dict() if len(found) == 1 else
                         {"objective": found[0].as_dict(), "algorithm": found[1].as_dict()}, indent=2))
        return 0
    if args.name in objectives:
        _show_objective(objectives[args.name])
    if args.name in algorithms:
        if args.name in objectives:
            print()
        _show_algorithm(algorithms[args.name])
    return 0


def _show_params(params) -> None:
    print("\nparameters:")
    if not params:
        print("  (none)")
    for p in params.values():
        print(f"  {p.describe()}")
        if p.doc:
            print(textwrap.fill(p.doc, 88, initial_indent="      ", subsequent_indent="      "))


def _show_paper(paper: dict) -> None:
    if paper:
        cite = ", ".join(str(paper[k]) for k in ("authors", "year") if paper.get(k))
        print(f"\npaper:    {paper.get('title', '')} ({cite})")
        if paper.get("url"):
            print(f"          {paper['url']}")


def _show_objective(spec) -> None:
    print(f"{spec.name}  (objective, {spec.kind}, package {spec.package})")
    print(textwrap.fill(spec.summary, 88))
    print(f"\nformula:  {spec.formula}")
    print(f"inputs:   {', '.join(spec.inputs)}")
    for device, how in (spec.cls.paths().items() if hasattr(spec.cls, "paths") else ()):
        print(f"{device + ':':<9} {how}")
    _show_params(spec.params)
    _show_paper(spec.paper)


def _show_algorithm(spec) -> None:
    print(f"{spec.name}  (training algorithm, package {spec.package})")
    print(textwrap.fill(spec.summary, 88))
    print(f"\nrecords:  {spec.cls.records}; trains {'/'.join(spec.cls.objective_kinds)} objectives")
    print(f"config:   algorithm: {{name: {spec.name}, ...parameters}}")
    _show_params(spec.params)
    _show_paper(dict(spec.cls.paper))


def _cmd_plugins(args: argparse.Namespace) -> int:
    from distillzoo.listing import plugins_info

    print(json.dumps(plugins_info(), indent=2))
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from distillzoo.starter import starter_config

    sys.stdout.write(starter_config(args.name))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from distillzoo.config import build_objective, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(OmegaConf.to_yaml(cfg))
    checked = []
    if cfg.objective is not None or cfg.objectives is not None:
        print(f"# objective: {build_objective(cfg)!r}".replace("\n", "\n# "))
        from distillzoo.training.spec import build_algorithm, resolve

        print(f"# algorithm: {build_algorithm(cfg, where=args.config)[0]!r}")
        if cfg.student is not None or cfg.data is not None or cfg.output_dir is not None:
            resolve(cfg, args.config, construct_callbacks=False)  # all that train checks before a model loads
            checked.append("train")
    if cfg.generate is not None:
        from distillzoo.teacher.generate import validate_generate

        validate_generate(cfg, args.config)
        checked.append("generate")
    if cfg.score is not None:
        from distillzoo.teacher.scoring import validate_score

        validate_score(cfg, args.config)
        checked.append("score")
    if cfg.curate is not None:
        from distillzoo.curate.pipeline import validate_curate

        validate_curate(cfg.curate, args.config, cfg)
        checked.append("curate")
    print(f"# checked for: {', '.join(checked)}" if checked else
          "# checked: the objective only; add student, data and output_dir to check it for distillzoo train")
    return 0


def _cmd_reference_cache(args: argparse.Namespace) -> int:
    from distillzoo.teacher.commands import reference_cache
    return reference_cache(args, _columns(args))


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from distillzoo.teacher.commands import cache_teacher
    return cache_teacher(args, _columns(args))


def _cmd_serve(args: argparse.Namespace) -> int:
    from distillzoo.teacher.server import serve
    return serve(args.model, **{k: v for k, v in vars(args).items() if k not in ("model", "command", "func")})


def _cmd_prepare(args: argparse.Namespace) -> int:
    from distillzoo.data.shards import prepare_shards
    from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM, load_tokenizer

    shards = prepare_shards(args.data, args.out, format=args.format, tokenizer=load_tokenizer(args.tokenizer),
                            max_length=args.max_length, dtype=args.dtype,
                            system=None if args.no_system else QWEN_DEFAULT_SYSTEM, overwrite=args.overwrite,
                            columns=_columns(args))
    meta = shards.meta
    print(f"wrote {meta['examples']} examples, {meta['tokens']} tokens ({meta['dtype']}) to {args.out}"
          + (f"; skipped {len(meta['skipped'])} with no response token within max_length" if meta["skipped"] else ""))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from distillzoo.config import load_config
    from distillzoo.training.loop import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, where=args.config)
    if os.environ.get("RANK", "0") == "0":
        print(f"trained {result.steps} steps; final loss {result.final_loss:.4f}; student saved to "
              f"{result.output_dir / 'final'}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distillzoo.atomic import write_text_atomically

    if args.data is None and not args.lm_eval:
        raise ConfigError("give --data FILE (held-out instruction records with reference answers), --lm-eval TASKS, "
                          "or both")
    report: dict = {}
    if args.data is not None:
        from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM
        from distillzoo.teacher.evaluation import Decoding, evaluate_model, table

        decoding = Decoding(args.samples, args.temperature, args.top_p, args.max_new_tokens, args.seed)
        summary, scores = evaluate_model(args.student, args.data, args.format, teacher=args.teacher, decoding=decoding,
                                         system=None if args.no_system else QWEN_DEFAULT_SYSTEM, max_length=args.max_length,
                                         columns=_columns(args), tokenizer=args.tokenizer, batch_size=args.batch_size,
                                         device=args.device)
        print(f"{args.student} on {args.data}: {summary['n']} prompts, {decoding.words}"
              + (f", teacher {args.teacher}" if args.teacher else ""))
        print(table(summary))
        report["held_out"] = {**summary, "prompts": scores.to_json()}
    if args.lm_eval:
        from distillzoo.teacher.lm_eval import run_lm_eval

        tasks = [t for t in args.lm_eval.split(",") if t]
        results = run_lm_eval(args.student, tasks, tasks_dir=args.lm_eval_tasks, limit=args.lm_eval_limit,
                              batch_size=args.batch_size, device=args.device, tokenizer=args.tokenizer)
        for task, metrics in results.get("results", results).items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float)))
            print(f"lm-eval {task}: {shown}")
        report["lm_eval"] = results
    if args.out:
        write_text_atomically(Path(args.out), json.dumps(report, indent=1, ensure_ascii=False) + "\n")
        print(f"written to {args.out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from distillzoo.config import load_config
    from distillzoo.teacher.generate import generate_from_config

    cfg = load_config(args.config, args.overrides)
    report = generate_from_config(cfg, where=args.config)
    if os.environ.get("RANK", "0") != "0":
        return 0  # rank 0 reports for all
    print(f"{cfg.generate.out}: wrote {report['written']} of {report['total']} "
          f"({report['already_done']} already there"
          + (f"; {len(report['empty'])} empty answers not written, first id {report['empty'][0]!r}"
             if report["empty"] else "") + ")")
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from distillzoo.config import load_config
    from distillzoo.teacher.scoring import score_from_config

    cfg = load_config(args.config, args.overrides)
    scores = score_from_config(cfg, where=args.config)
    if os.environ.get("RANK", "0") != "0":
        return 0
    values = sorted(scores.values())
    middle = values[len(values) // 2] if values else float("nan")
    print(f"scored {len(scores)} samples with {cfg.score.scorer['name']} into {cfg.score.out} "
          f"(min {values[0] if values else float('nan'):.4g}, median {middle:.4g}, "
          f"max {values[-1] if values else float('nan'):.4g})")
    return 0


def _cmd_curate(args: argparse.Namespace) -> int:
    from distillzoo.config import load_config
    from distillzoo.curate.pipeline import curate

    cfg = load_config(args.config, args.overrides)
    report = curate(cfg.curate, where=args.config, say=lambda line: print(f"curate: {line}", file=sys.stderr), cfg=cfg)
    print(f"{cfg.curate.out}: kept {report['output']} of {report['input']} records ({report['malformed']} malformed; "
          + ", ".join(f"{s['stage']} dropped {s['dropped']}" for s in report["stages"]) + ")")
    return 0


def _cmd_filter(args: argparse.Namespace) -> int:
    from distillzoo.teacher.scoring import filter_records, read_scores

    result = filter_records(args.data, args.format, read_scores(args.scores), args.out, threshold=args.threshold,
                            quantile=args.quantile, report=args.report, columns=_columns(args))
    print(f"kept {result['kept']} of {result['kept'] + result['dropped']} records (score >= {result['cut']:.4g}) "
          f"in {args.out}" + (f"; dropped ones listed in {args.report}" if args.report else ""))
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distillzoo.compare.runner import compare

    results = compare(args.config, say=lambda line: print(f"compare: {line}", file=sys.stderr, flush=True))
    sys.stdout.write((Path(results["output_dir"]) / "report.md").read_text(encoding="utf-8"))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from distillzoo.compare.plots import plot_runs

    fig = plot_runs(args.runs, args.out, args.metric or None)
    print(f"{args.out}: {', '.join(ax.get_title() for ax in fig.axes)} of {len(args.runs)} run(s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillzoo",
        description="A plugin-based zoo of distillation objectives for Qwen-family students.",
    )
    from distillzoo import __version__

    parser.add_argument("--version", action="version", version=f"distillzoo {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="list every objective, built-in and third-party")
    p.add_argument("--json", action="store_true", help="print the catalogue entries as JSON")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("algorithms", help="list every training algorithm distillzoo train runs, built-in and "
                                          "third-party (select one with algorithm: {name: ...})")
    p.add_argument("--json", action="store_true", help="print name, package, records, params and paper as JSON")
    p.set_defaults(func=_cmd_algorithms)
    p = sub.add_parser("show", help="formula or records, parameters and paper of one objective or training algorithm")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_show)
    p = sub.add_parser("plugins", help="JSON of the loaded plugins: package, version, hooks, names")
    p.set_defaults(func=_cmd_plugins)
    p = sub.add_parser("config", help="print a starter YAML config for one objective")
    p.add_argument("name")
    p.set_defaults(func=_cmd_config)
    p = sub.add_parser("check", help="validate a config (with key=value overrides) and print it resolved")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_check)
    p = sub.add_parser("train", help="distil a teacher into a student as a config says (key=value overrides)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("eval", help="score a saved student on held-out instruction records (ROUGE-L, exact match, "
                                    "NLL, teacher agreement, per task and language) and/or lm-eval tasks")
    p.add_argument("student", help="a saved model directory (a train run's final/)")
    p.add_argument("--data", default=None, help="held-out records with reference answers (JSONL, JSON, Parquet, Arrow, "
                                                "a datasets directory)")
    p.add_argument("--format", default="chat", help="their data format (default chat; dolly, alpaca, ...)")
    _add_columns(p)
    p.add_argument("--teacher", default=None, help="a teacher model directory: adds top-1 agreement, KL and TVD "
                                                   "teacher-forced on the references")
    p.add_argument("--samples", type=int, default=1, help="answers per prompt (default 1; the papers sample several)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); the papers sample at 1.0")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (each prompt's draws depend on it and the id)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="the longest answer (default: one token more "
                                                                    "than the longest reference)")
    p.add_argument("--max-length", type=int, default=None, help="as the run's data.max_length: the teacher-forced "
                                                                "metrics read the references cut there")
    p.add_argument("--no-system", action="store_true", help="as data.system: null in training")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: the embedded Qwen vocabulary)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS", help="comma-separated lm-evaluation-harness tasks to "
                                                                    "run on the student (needs distillzoo[lm-eval])")
    p.add_argument("--lm-eval-tasks", default=None, metavar="DIR", help="a directory of local lm-eval task YAMLs "
                                                                        "(nothing is fetched from a hub)")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="at most this many examples per lm-eval task")
    p.add_argument("--out", default=None, help="a JSON file: the summary and every prompt's scores and answers")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("generate", help="answer a dataset's prompts with the teacher or student (or both, as "
                                        "preference pairs) as the config's generate section says; resumable")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("score", help="rate each sample with a scorer (mfd, judge, or a plugin's) as the config's "
                                     "score section says; writes {id, score} JSONL")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_score)
    p = sub.add_parser("curate", help="run instruction or preference records through the curation stages of the "
                                      "config's curate section (dedup, decontaminate, quality, balance, tag, score, expand, "
                                      "rewrite, a plugin's); resumable")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.set_defaults(func=_cmd_curate)
    p = sub.add_parser("filter", help="keep the records whose score passes a threshold or quantile")
    p.add_argument("data", help="the records the scores were computed on (JSONL, JSON, Parquet, Arrow, a datasets "
                                "save_to_disk directory)")
    p.add_argument("--format", required=True, help="its data format (gives each record's sample id)")
    _add_columns(p)
    p.add_argument("--scores", required=True, help="distillzoo score's output")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--threshold", type=float, help="keep records scoring at least this")
    group.add_argument("--quantile", type=float, help="keep records scoring at least this quantile of the scores "
                                                      "(0.75: the top quarter)")
    p.add_argument("--out", required=True, help="the filtered JSONL (JSONL records verbatim, other rows as JSON; "
                                                "written atomically)")
    p.add_argument("--report", default=None, help="a JSON report: counts, cut, and every dropped id with its score")
    p.set_defaults(func=_cmd_filter)
    p = sub.add_parser("compare", help="train entrants (objectives, mixtures, plugins') x seeds under one budget "
                                       "and report held-out metrics none of them trains on")
    p.add_argument("config", help="a compare YAML: base, entrants, seeds, held_out (see distillzoo.compare.runner)")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("plot", help="draw the curves of training runs from their metrics.jsonl to a PNG")
    p.add_argument("runs", nargs="+", help="distillzoo train output directories")
    p.add_argument("--out", default="curves.png", help="the PNG to write (default curves.png)")
    p.add_argument("--metric", action="append", help="a logged key to draw, repeatable (default: loss and every "
                                                     "eval/* value)")
    p.set_defaults(func=_cmd_plot)
    p = sub.add_parser("prepare", help="tokenize instruction records (dolly, alpaca, chat) into an int32 shard "
                                       "directory")
    p.add_argument("data", nargs="+", help="JSONL, JSON, Parquet or Arrow file(s), or datasets save_to_disk "
                                           "directories")
    p.add_argument("--format", required=True, help="a registered data format: dolly, alpaca, chat, ...")
    _add_columns(p)
    p.add_argument("--out", required=True, help="the directory to write (atomically)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: the embedded Qwen vocabulary)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per example; longer ones are cut at the end")
    p.add_argument("--dtype", default="int32", help="int32 (default), or uint16 for a vocab of at most 65,536")
    p.add_argument("--no-system", action="store_true", help="no default system message for conversations without one")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("cache-teacher", help="run a teacher once over instruction data and store its top-k "
                                             "log-probs per response token, keyed by sample id (resumable)")
    p.add_argument("model", help="local transformers model directory, or a teacher server's URL (vllm serve, "
                                 "distillzoo serve; with --served-model, --api, --vocab-size)")
    p.add_argument("data", nargs="+", help="a distillzoo prepare directory, or records with --format (JSONL, JSON, "
                                           "Parquet, Arrow, datasets save_to_disk directories)")
    _add_columns(p)
    p.add_argument("--served-model", default=None, help="a server's model name (checked against /v1/models)")
    p.add_argument("--api", default="openai", choices=("openai", "sglang"), help="a server's scoring API (teacher.api)")
    p.add_argument("--vocab-size", type=int, default=151936, help="a served teacher's head size (default 151936)")
    p.add_argument("--out", required=True, help="the cache directory (a rerun finishes an interrupted one)")
    p.add_argument("--k", type=int, default=32, help="ids kept per token (default 32)")
    p.add_argument("--temperature", type=float, default=1.0, help="the objective's temperature (default 1)")
    p.add_argument("--dtype", default="bfloat16", help="log-prob storage: bfloat16 (default), float16, float32")
    p.add_argument("--format", default=None, help="the data format of JSONL input (dolly, alpaca, chat, ...)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: the embedded Qwen vocabulary)")
    p.add_argument("--max-length", type=int, default=None, help="as in training (JSONL input)")
    p.add_argument("--no-system", action="store_true", help="as data.system: null in training (JSONL input)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=1024, help="samples per shard (the unit of resuming)")
    p.add_argument("--model-dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_placement(p)
    p.set_defaults(func=_cmd_cache_teacher)
    p = sub.add_parser("serve", help="serve a model over the OpenAI-compatible API a served teacher reads")
    p.add_argument("model", help="local transformers model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this host only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free one, printed)")
    p.add_argument("--allow-remote", action="store_true", help="allow a --host other than this host's loopback")
    p.add_argument("--served-model-name", default=None, help="the name /v1/models gives (default: the directory)")
    p.add_argument("--max-logprobs", type=int, default=64, help="the most prompt_logprobs a request may ask for")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: the embedded Qwen vocabulary)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    p.add_argument("--device", default=None, help="cpu (default), cuda, cuda:1")
    p.set_defaults(func=_cmd_serve)
    p = sub.add_parser("reference-cache", help="score preference data under a frozen reference/teacher model once, "
                                               "into a side file that dpo/dpkd training reads instead of the model")
    p.add_argument("model", help="local transformers model directory")
    p.add_argument("data", nargs="+", help="preference records (JSONL, JSON, Parquet, Arrow, datasets directories)")
    _add_columns(p)
    p.add_argument("--out", required=True, help="the cache file to write (atomically)")
    p.add_argument("--tokenizer", default=None, help="local tokenizer directory (default: the embedded Qwen vocabulary)")
    p.add_argument("--max-length", type=int, default=None, help="as in training: prompt + response tokens per row")
    p.add_argument("--max-prompt-length", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", default=None, help="float32, bfloat16, ... (default: the checkpoint's)")
    _add_placement(p)
    p.set_defaults(func=_cmd_reference_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DistillzooError as e:
        print(f"distillzoo {args.command}: error: {e}", file=sys.stderr)
        return 2
