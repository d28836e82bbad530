"""lm-evaluation-harness on a saved distillzoo student, with local task files only.

:func:`run_lm_eval` loads a student directory (a run's ``final/``: ``save_pretrained``
output, no tokenizer files), wraps it with distillzoo's own Qwen tokenizer in
:class:`DistillzooLM` (lm-eval's ``LM`` interface: ``loglikelihood``,
``loglikelihood_rolling``, greedy ``generate_until``) and runs ``lm_eval.simple_evaluate``
on the tasks named, returning ``{"results": {task: {metric: value}}, ...}``.

Your own tasks: put lm-eval task YAMLs in a directory and pass it as ``tasks_dir``
(``distillzoo eval STUDENT --lm-eval my_task --lm-eval-tasks DIR``). Point each at local
data, e.g. ``dataset_path: json`` with ``dataset_kwargs: {data_files: {test: /abs/path.jsonl}}``
and ``test_split: test`` (relative ``data_files`` resolve against the working directory,
not the YAML's). The hub is kept offline throughout (``HF_HUB_OFFLINE``), so lm-eval's
built-in tasks work only when their datasets are already in the local Hugging Face cache.

lm-eval is imported when :func:`run_lm_eval` is called (or ``DistillzooLM`` first used),
never when distillzoo is.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import functools
import inspect
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from distillzoo.errors import ConfigError, DataError, DistillzooError, ParameterError

__all__ = ["run_lm_eval", "check_student_dir", "resolve_tasks", "hub_offline"]  # and DistillzooLM, made on first use

#: the files that hold a ``save_pretrained`` model's weights (one of them must be there)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
#: the environment variables that keep huggingface_hub and datasets off the network
OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def check_student_dir(path: str | Path) -> Path:
    """``path`` as a model directory, or a DataError naming it and what is missing (config.json, weights)."""
    directory = Path(path)
    if not directory.exists():
        raise DataError(f"student {str(path)!r} does not exist; give a saved student directory (a distillzoo train "
                        "run's final/, or any local transformers causal LM directory)")
    if not directory.is_dir():
        raise DataError(f"student {str(path)!r} is a file, not a model directory; give the directory that holds "
                        "config.json and model.safetensors (a run's final/)")
    missing = []
    if not (directory / "config.json").is_file():
        missing.append("config.json")
    if not any((directory / name).is_file() for name in WEIGHT_FILES) and not any(directory.glob("*.safetensors")):
        missing.append("weights (model.safetensors or pytorch_model.bin)")
    if missing:
        found = sorted(p.name for p in directory.iterdir())
        shown = (", ".join(found[:8]) + (f", ... ({len(found)} entries)" if len(found) > 8 else "")) or "nothing"
        hint = f"; did you mean {str(directory / 'final')!r}?" if (directory / "final").is_dir() else \
            "; give a run's final/ directory"
        raise DataError(f"student {str(path)!r} is not a model directory: it has no {' and no '.join(missing)} "
                        f"(it holds {shown}){hint}")
    return directory


# ---------------------------------------------------------------------------- the LM
@functools.lru_cache(maxsize=1)
def _lm_class() -> type:
    """:class:`DistillzooLM`, defined on first use so that lm-eval is imported only then."""
    from lm_eval.api.model import LM

    class DistillzooLM(LM):
        """lm-eval's ``LM`` over a transformers causal LM and a distillzoo :class:`ChatTokenizer`.

        Plain text (no chat template) is encoded with ``tokenizer.encode``; an empty context
        is the ``<|endoftext|>`` token. A continuation is scored as lm-eval's own ``hf`` model
        does: trailing spaces of the context move to the continuation, ``context +
        continuation`` is encoded whole and the continuation is its tokens past those of the
        context alone. Requests run in batches of ``batch_size`` without gradients on the
        model's device; requests with the same model input share one forward pass.
        ``generate_until`` decodes greedily (a task asking for sampling is refused), stopping
        at ``until``, ``<|endoftext|>``, ``<|im_end|>`` or ``max_gen_toks``.
        """

        def __init__(self, model, tokenizer, *, batch_size: int = 8, max_length: int | None = None,
                     max_gen_toks: int = 256) -> None:
            super().__init__()
            if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
                raise ParameterError(f"batch_size must be an integer >= 1, got {batch_size!r}")
            self.model = model.eval()
            self.tok = tokenizer
            self.batch_size = batch_size
            self.max_length = int(max_length or getattr(model.config, "max_position_embeddings", None) or 2048)
            self.max_gen_toks = int(max_gen_toks)
            self.eot_token_id = tokenizer.pad_id  # <|endoftext|>
            self.stop_ids = {tokenizer.pad_id, tokenizer.im_end_id}
            self._device = next(model.parameters()).device
            forward = inspect.signature(model.forward).parameters
            self._keeps_logits = "logits_to_keep" in forward
            self._cache_kw = "cache" if "cache" in forward else "past_key_values"

        @property
        def tokenizer_name(self) -> str:
            return self.tok.name

        def get_model_info(self) -> dict:
            """What lm-eval records of the model in its results' ``config``."""
            p = next(self.model.parameters())
            return {"model_num_parameters": sum(x.numel() for x in self.model.parameters()),
                    "model_dtype": str(p.dtype), "tokenizer": self.tok.name, "max_length": self.max_length}

        # ------------------------------------------------------------ tokenization
        def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
            """``(context ids, continuation ids)`` of a loglikelihood request, as lm-eval's ``hf`` model splits them."""
            if not context:
                return [self.eot_token_id], self.tok.encode(continuation)
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole, ctx = self.tok.encode(context + continuation), self.tok.encode(context)
            return ctx, whole[len(ctx):]

        # ------------------------------------------------------------ scoring
        def _logits(self, input_ids: torch.Tensor, mask: torch.Tensor, keep: int) -> torch.Tensor:
            extra = {"logits_to_keep": keep} if self._keeps_logits else {}
            logits = self.model(input_ids=input_ids, attention_mask=mask, use_cache=False, **extra).logits
            return logits[:, -keep:]

        @torch.no_grad()
        def loglikelihood_tokens(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]
                                 ) -> list[tuple[float, bool]]:
            """``(sum log p(continuation | context), whether greedy decoding yields it)`` per token-id pair.

            The context is cut from the left to fit ``max_length`` model positions.
            """
            out: list[tuple[float, bool] | None] = [None] * len(pairs)
            inputs: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
            for i, (ctx, cont) in enumerate(pairs):
                ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
                if not cont:
                    out[i] = (0.0, True)
                    continue
                if not ctx:
                    raise ParameterError(f"request {i}: an empty context; give at least one token "
                                         f"(<|endoftext|> = {self.eot_token_id})")
                if len(cont) > self.max_length:
                    raise ParameterError(f"request {i}: a continuation of {len(cont)} tokens does not fit the "
                                         f"model's {self.max_length} positions")
                whole = (ctx + cont)[-(self.max_length + 1):]
                inputs.setdefault(tuple(whole[:-1]), []).append((i, cont))
            keys = sorted(inputs, key=len, reverse=True)
            for start in range(0, len(keys), self.batch_size):
                batch = keys[start:start + self.batch_size]
                width = len(batch[0])
                ids = torch.full((len(batch), width), self.eot_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, key in enumerate(batch):  # right padding: no real position sees a pad
                    ids[row, :len(key)] = torch.tensor(key, dtype=torch.long)
                    mask[row, :len(key)] = 1
                keep = width - min(len(k) - max(len(c) for _, c in inputs[k]) for k in batch)
                logits = self._logits(ids.to(self._device), mask.to(self._device), keep)
                for row, key in enumerate(batch):
                    for i, cont in inputs[key]:
                        first = len(key) - len(cont) - (width - keep)  # the position that predicts cont[0]
                        log_probs = torch.log_softmax(logits[row, first:first + len(cont)].float(), dim=-1)
                        target = torch.tensor(cont, dtype=torch.long, device=log_probs.device)
                        picked = log_probs.gather(-1, target[:, None]).squeeze(-1)
                        out[i] = (float(picked.sum()), bool((log_probs.argmax(-1) == target).all()))
            return out  # type: ignore[return-value]

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            args = [req.args for req in requests]
            results = self.loglikelihood_tokens([self.encode_pair(ctx, cont) for ctx, cont in args])
            for (ctx, cont), answer in zip(args, results):
                self.cache_hook.add_partial("loglikelihood", (ctx, cont), answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            """Each text's whole log-likelihood after ``<|endoftext|>``, in windows of ``max_length`` tokens
            (each token scored once; the last window gets a full context)."""
            pairs, owner = [], []
            size = self.max_length
            for r, (text,) in enumerate(req.args for req in requests):
                tokens = self.tok.encode(text)
                full = [self.eot_token_id] + tokens
                for i in range(0, len(tokens), size):
                    cont = tokens[i:i + size]
                    pairs.append((full[max(0, i + len(cont) - size):i + 1], cont))
                    owner.append(r)
            totals = [0.0] * len(requests)
            for r, (logp, _) in zip(owner, self.loglikelihood_tokens(pairs)):
                totals[r] += logp
            for req, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
            return totals

        # ------------------------------------------------------------ generation
        def _settings(self, gen_kwargs: dict) -> tuple[list[str], int]:
            from lm_eval.models.utils import normalize_gen_kwargs

            kwargs = normalize_gen_kwargs(dict(gen_kwargs or {}), self.max_gen_toks)
            if kwargs.get("do_sample"):
                raise ConfigError(f"generation_kwargs {gen_kwargs}: the task asks for sampling; distillzoo's lm-eval "
                                  "model decodes greedily only (do_sample: false, temperature: 0)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else [s for s in until if s]
            max_new = int(kwargs["max_gen_toks"])
            if not 0 < max_new < self.max_length:
                raise ConfigError(f"generation_kwargs {gen_kwargs}: max_gen_toks {max_new} must be in "
                                  f"[1, {self.max_length}) (the model's positions)")
            return until, max_new

        @staticmethod
        def _cut(text: str, until: list[str]) -> str:
            for stop in until:
                text = text.split(stop)[0]
            return text

        @torch.no_grad()
        def greedy(self, prompts: Sequence[Sequence[int]], until: list[str], max_new: int) -> list[str]:
            """The greedy continuation text of each token-id prompt, cut before the first stop string."""
            texts = []
            for start in range(0, len(prompts), self.batch_size):
                chunk = [list(p) for p in prompts[start:start + self.batch_size]]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), self.eot_token_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, p in enumerate(chunk):  # left padding, positions counted from each row's first token
                    ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
                    mask[row, width - len(p):] = 1
                ids, mask = ids.to(self._device), mask.to(self._device)
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                extra = {"logits_to_keep": 1} if self._keeps_logits else {}
                step = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
                answers: list[list[int]] = [[] for _ in chunk]
                done = [False] * len(chunk)
                for _ in range(max_new):
                    token = step.logits[:, -1].argmax(-1)
                    for row, t in enumerate(token.tolist()):
                        if done[row]:
                            continue
                        if t in self.stop_ids:
                            done[row] = True
                            continue
                        answers[row].append(t)
                        if until and any(s in self.tok.decode(answers[row]) for s in until):
                            done[row] = True
                    if all(done):
                        break
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                    positions = positions[:, -1:] + 1
                    step = self.model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                                      use_cache=True, **{self._cache_kw: getattr(step, self._cache_kw)}, **extra)
                texts += [self._cut(self.tok.decode(a), until) for a in answers]
            return texts

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            groups: dict[str, tuple[dict, list[int]]] = {}
            for i, req in enumerate(requests):
                gen_kwargs = req.args[1] if len(req.args) > 1 else {}
                key = json.dumps(gen_kwargs, sort_keys=True, default=str)
                groups.setdefault(key, (gen_kwargs, []))[1].append(i)
            for gen_kwargs, members in groups.values():
                until, max_new = self._settings(gen_kwargs)
                room = self.max_length - max_new
                prompts = {i: (self.tok.encode(requests[i].args[0]) or [self.eot_token_id])[-room:] for i in members}
                order = sorted(members, key=lambda i: -len(prompts[i]))
                for i, text in zip(order, self.greedy([prompts[i] for i in order], until, max_new)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return out  # type: ignore[return-value]

    DistillzooLM.__module__ = __name__
    return DistillzooLM


def __getattr__(name: str):
    if name == "DistillzooLM":  # defined lazily: subclassing lm-eval's LM imports lm-eval
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---------------------------------------------------------------------------- tasks
@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub and datasets offline for the block (the environment and their already-read settings),
    then as they were."""
    saved_env = {var: os.environ.get(var) for var in OFFLINE_VARS}
    os.environ.update({var: "1" for var in OFFLINE_VARS})
    import datasets.config
    import huggingface_hub.constants

    patched = [(huggingface_hub.constants, "HF_HUB_OFFLINE"), (datasets.config, "HF_HUB_OFFLINE"),
               (datasets.config, "HF_DATASETS_OFFLINE")]
    saved = [(module, attr, getattr(module, attr)) for module, attr in patched if hasattr(module, attr)]
    for module, attr, _ in saved:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        for var, value in saved_env.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def _local_only(name: str, index: dict, seen: frozenset = frozenset()) -> bool:
    """Whether task/group/tag ``name`` of an index built from the tasks dir alone needs nothing from elsewhere."""
    entry = index.get(name)
    if entry is None or name in seen:
        return entry is not None
    if getattr(entry.kind, "name", "") != "GROUP":
        return True
    children = (entry.cfg or {}).get("task") or []
    children = [children] if isinstance(children, (str, dict)) else children
    return all(_local_only(c, index, seen | {name}) if isinstance(c, str) else True for c in children)


def _expand(names: Sequence[str], known: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(resolved names, unknown names)``: globs expanded against ``known``; a YAML file path kept as it is."""
    resolved, unknown = [], []
    for name in names:
        if name in known:
            resolved.append(name)
        elif _is_pattern(name) and fnmatch.filter(known, name):
            resolved += [n for n in sorted(fnmatch.filter(known, name)) if n not in resolved]
        elif name.endswith((".yaml", ".yml")) and Path(name).is_file():
            resolved.append(name)
        else:
            unknown.append(name)
    return resolved, unknown


def _unread_yamls(tasks_dir: Path, index: dict) -> list[str]:
    """YAML files under ``tasks_dir`` that define no task in ``index`` (lm-eval skips unreadable ones silently)."""
    read = {Path(e.yaml_path).resolve() for e in index.values() if getattr(e, "yaml_path", None)}
    return sorted(str(p.relative_to(tasks_dir)) for p in tasks_dir.glob("**/*.yaml") if p.resolve() not in read)


def resolve_tasks(tasks: Sequence[str], tasks_dir: str | Path | None):
    """``(TaskManager, task names)`` for ``tasks``; a ConfigError naming any unknown task and where it was sought.

    A tasks dir whose own files define every task asked for is indexed alone (lm-eval's
    built-in index takes seconds to build); otherwise the built-in tasks are searched too.
    """
    from lm_eval.tasks import TaskManager

    names = [str(t).strip() for t in tasks if str(t).strip()]
    if not names:
        raise ConfigError("no lm-eval task given; name at least one (--lm-eval TASK[,TASK...])")
    directory = None
    if tasks_dir is not None:
        directory = Path(tasks_dir)
        if not directory.is_dir():
            raise ConfigError(f"lm-eval tasks dir {str(tasks_dir)!r} is not a directory; give a directory of "
                              "lm-eval task YAML files (--lm-eval-tasks DIR)")
        local = TaskManager(include_path=str(directory), include_defaults=False)
        resolved, unknown = _expand(names, local.all_tasks)
        if not unknown and all(_local_only(n, local.task_index) for n in resolved if n in local.task_index):
            return local, resolved
    manager = TaskManager(include_path=str(directory) if directory is not None else None)
    resolved, unknown = _expand(names, manager.all_tasks)
    if unknown:
        name = unknown[0]
        where = (f"is not defined in {str(directory)!r} (its *.yaml files, searched recursively) nor among lm-eval's "
                 "built-in tasks" if directory is not None else
                 "is not among lm-eval's built-in tasks (no tasks dir given: --lm-eval-tasks DIR / tasks_dir=)")
        message = f"lm-eval task {name!r} {where}"
        if len(unknown) > 1:
            message += f"; nor are {unknown[1:]}"
        message += "."
        own = sorted(manager.all_tasks) if directory is None else \
            sorted(n for n, e in manager.task_index.items()
                   if getattr(e, "yaml_path", None) and directory.resolve() in Path(e.yaml_path).resolve().parents)
        close = difflib.get_close_matches(name, own, n=3, cutoff=0.6) if directory is not None else []
        close += [c for c in difflib.get_close_matches(name, manager.all_tasks, n=3, cutoff=0.6) if c not in close]
        if close:
            message += " Did you mean " + ", ".join(repr(c) for c in close[:3]) + "?"
        if directory is not None:
            message += (f" {str(directory)!r} defines {own[:10] + (['...'] if len(own) > 10 else [])}." if own else
                        f" {str(directory)!r} defines no task.")
            skipped = _unread_yamls(directory, manager.task_index)
            if skipped:
                message += (f" lm-eval could not read a task from {skipped[:5]}"
                            + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
                            + " (a YAML error, or no 'task:' key; lm-eval skips such files silently).")
        raise ConfigError(message)
    return manager, resolved


# ---------------------------------------------------------------------------- results
def _plain(value: Any) -> Any:
    """A JSON value of an lm-eval result: numpy scalars as Python numbers, NaN and infinities as None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, (bool, int, str)):
        return value
    return str(value)


def _metrics(row: dict) -> dict:
    """An lm-eval results row as ``{metric: value}``: ``acc,none`` becomes ``acc``, ``exact_match,strict-match``
    stays as it is; what is no ``metric,filter`` entry (``alias``, ``name``, ``sample_len``) is dropped."""
    out = {}
    for key, value in row.items():
        metric, comma, filt = str(key).partition(",")
        if not comma:
            continue
        out[metric if filt in ("", "none") else key] = _plain(value)
    return out


def run_lm_eval(student_dir: str | Path, tasks: list[str], *, tasks_dir: str | Path | None = None,
                limit: int | float | None = None, batch_size: int = 8, num_fewshot: int | None = None,
                device: str | None = None, tokenizer: str | None = None) -> dict:
    """lm-eval's numbers for a saved student on ``tasks`` (names, globs or YAML paths), offline.

    Args:
        student_dir: a ``save_pretrained`` directory (a run's ``final/``).
        tasks: lm-eval task, group or tag names; looked up in ``tasks_dir``, then among lm-eval's own.
        tasks_dir: a directory of task YAMLs (searched recursively).
        limit: at most this many examples per task (a fraction < 1: that share of them).
        batch_size: requests per forward pass.
        num_fewshot: few-shot examples per prompt (None: each task's own setting, else 0).
        device: where the model runs (None: cpu, as ``distillzoo eval``).
        tokenizer: a local transformers tokenizer directory (None: the embedded Qwen tokenizer).

    Returns:
        ``{"results": {task: {metric: value}}, "groups": {...}, "versions", "n-shot", "n-samples",
        "higher_is_better", "config": {...}}``, JSON-serialisable; metric keys drop lm-eval's
        ``,none`` filter suffix (``acc``, ``acc_stderr``).
    """
    directory = check_student_dir(student_dir)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
        raise ConfigError(f"lm-eval limit must be a positive number of examples (or a fraction < 1), got {limit!r}")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or isinstance(num_fewshot, bool)
                                    or num_fewshot < 0):
        raise ConfigError(f"lm-eval num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("lm-eval is not installed; pip install 'distillzoo[lm-eval]' (or lm-eval)") from None
    from distillzoo.data.tokenizer import load_tokenizer
    from distillzoo.models.causal_lm import load_causal_lm

    with hub_offline():
        manager, names = resolve_tasks(tasks, tasks_dir)
        try:
            model = load_causal_lm(str(directory), device=device)
        except DistillzooError as e:
            raise DataError(f"student {str(student_dir)!r}: {e}") from None
        tok = load_tokenizer(tokenizer)
        lm = _lm_class()(model, tok, batch_size=batch_size)
        try:
            out = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit,
                                          num_fewshot=num_fewshot, batch_size=batch_size, log_samples=False)
        except ConnectionError as e:  # what datasets raises for a hub dataset when offline
            raise DataError(f"lm-eval tasks {names}: {e}. distillzoo runs lm-eval offline: point the task at local "
                            "files (dataset_path: json, dataset_kwargs: {data_files: ...}) or have its dataset in "
                            "the local Hugging Face cache") from None
        except FileNotFoundError as e:
            raise DataError(f"lm-eval tasks {names}: {e} (relative data_files resolve against the working "
                            f"directory, {os.getcwd()!r}, not the task YAML's)") from None
    import transformers

    return {
        "results": {task: _metrics(row) for task, row in out.get("results", {}).items()},
        "groups": {group: _metrics(row) for group, row in out.get("groups", {}).items()},
        "versions": _plain(out.get("versions", {})),
        "n-shot": _plain(out.get("n-shot", {})),
        "n-samples": _plain(out.get("n-samples", {})),
        "higher_is_better": _plain(out.get("higher_is_better", {})),
        "config": _plain({
            "student": str(directory), "tasks": names, "tasks_dir": None if tasks_dir is None else str(tasks_dir),
            "limit": limit, "num_fewshot": num_fewshot, "batch_size": batch_size, "device": str(lm.device),
            **lm.get_model_info(), "lm_eval_version": getattr(lm_eval, "__version__", None),
            "transformers_version": transformers.__version__, "torch_version": torch.__version__,
            "random_seed": (out.get("config") or {}).get("random_seed"), "date": out.get("date"),
        }),
    }
