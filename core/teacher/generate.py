"""Answers from a causal LM for the prompts of a dataset: batched, sampled per sample id, resumable.

Answers come from :func:`~distillzoo.models.generation.decode`: each row is sampled
from its own generator, seeded by the run's seed and the sample's id, so an answer
does not depend on its batch nor on whether the run was interrupted and resumed. A
role given as ``server: URL`` answers from that server instead
(:meth:`~distillzoo.teacher.served.ServedTeacher.generate`: one request per prompt,
its ``seed`` derived from the run's seed and the sample's id in the same way).

:func:`generate_file` writes one JSONL line per prompt, keyed by the sample id:
each process appends a batch at a time (flushed and fsynced) to its part of the
output, and the parts are merged into it in prompt order at the end (see
:mod:`distillzoo.teacher.parts`). Rerun on the same output, it skips the ids already
there or in a part; a last line cut off mid-write is dropped first, so an
interrupted run neither duplicates nor loses samples. Under ``torchrun`` each
rank answers its share of the batches, and the output is the one process's.

Records: ``responses`` mode writes the chat format (the prompt's messages plus
the answer, which ``chat`` training reads directly); ``pairs`` mode writes the
preference format, the teacher's answer as ``chosen`` and the student's as
``rejected``, which ``dpkd`` trains on directly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from distillzoo.data.records import read_records
from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM, ChatTokenizer
from distillzoo.errors import DataError, ParameterError
from distillzoo.models.causal_lm import check_vocab, place_model, require_model
from distillzoo.models.generation import Sampling, decode
from distillzoo.teacher.launch import Launch
from distillzoo.teacher.parts import PartedOutput


def read_prompts(path: str | Path, format: str, columns: dict | None = None) -> list[tuple[str, list[dict]]]:
    """``(sample id, prompt messages)`` per record: the conversation before its last assistant reply.

    Ids must be unique: they key the output, the resume and later the teacher cache.
    """
    prompts, seen = [], {}
    for where, fields in read_records(path, format, columns):
        messages = fields.get("messages") or fields.get("prompt")
        if not messages:
            raise DataError(f"{where}: format {format!r} gives no prompt ('messages' or 'prompt')")
        if messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end with a user turn")
        sample_id = str(fields["id"])
        if sample_id in seen:
            raise DataError(f"{where}: sample id {sample_id!r} repeats {seen[sample_id]}; ids key the output")
        seen[sample_id] = where
        prompts.append((sample_id, messages))
    return prompts


def generate_file(models: dict, tokenizer: ChatTokenizer, data: str | Path, format: str, out: str | Path,
                  sampling: Sampling = Sampling(), *, mode: str = "responses", system: str | None = QWEN_DEFAULT_SYSTEM,
                  batch_size: int = 16, progress: bool = True, columns: dict | None = None,
                  launch: Launch | None = None) -> dict:
    """Answer every prompt of ``data`` not yet in ``out`` (or in a part of it: see :mod:`distillzoo.teacher.parts`).

    Under torchrun (``launch``), each rank answers every ``world``-th batch and rank 0
    writes ``out`` in the order of the prompts, as one process would.

    Returns ``{"written", "already_done", "empty", "total"}``; ``empty`` lists the ids
    whose answer (either answer, for pairs) was empty: they are not written, since
    no training format takes an empty reply (a rerun tries them again, and the same
    seed gives the same answer).

    ``models``: ``{"responses": model}`` for ``mode="responses"``, or
    ``{"chosen": teacher, "rejected": student}`` for ``mode="pairs"``.
    """
    names = {"responses": ("responses",), "pairs": ("chosen", "rejected")}
    if mode not in names:
        raise ParameterError(f"generate mode {mode!r} is not one of {list(names)}")
    if set(models) != set(names[mode]):
        raise ParameterError(f"generate mode {mode!r} needs models {list(names[mode])}, got {sorted(models)}")
    from distillzoo.teacher.served import identity

    launch = launch or Launch()
    output = PartedOutput(out, launch, identity={
        "mode": mode, "models": {role: identity(m) for role, m in models.items()},
        "sampling": dataclasses.asdict(sampling), "system": system, "data": str(data), "format": format,
        "columns": columns})
    prompts = read_prompts(data, format, columns)
    done = output.done()
    todo = [(i, m) for i, m in prompts if i not in done]
    batches = [todo[start:start + batch_size] for start in range(0, len(todo), batch_size)]
    mine = launch.mine(len(batches))  # whole batches, dealt round-robin: each decoded as one process decodes it
    empty: list[str] = []
    bar = None
    if progress and launch.main:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(batches[b]) for b in mine), desc=f"distillzoo generate ({mode})")
    for b in mine:
        chunk = batches[b]
        ids = [i for i, _ in chunk]
        tokens = [tokenizer.encode_prompt(m, system) for _, m in chunk]
        answers = {role: model.generate(tokens, sampling, ids, [tokenizer.im_end_id]) if _served(model) else
                   decode(model, tokenizer, tokens, sampling, ids=ids, batch_size=batch_size)
                   for role, model in models.items()}
        texts = {role: [tokenizer.decode(tokens) for tokens, _ in out] for role, out in answers.items()}
        records = []
        for k, (sample_id, messages) in enumerate(chunk):
            if any(not texts[role][k].strip() for role in models):
                empty.append(sample_id)  # neither chat nor preference training takes an empty reply
                continue
            finish = {role: answers[role][k][1] for role in models}
            if mode == "responses":
                records.append({"id": sample_id,
                                "messages": [*messages, {"role": "assistant", "content": texts["responses"][k]}],
                                "finish_reason": finish["responses"]})
            else:
                records.append({"id": sample_id, "prompt": messages, "chosen": texts["chosen"][k],
                                "rejected": texts["rejected"][k], "finish_reason": finish})
        output.append(records)
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    output.merge([i for i, _ in prompts])
    empty = sorted((i for part in launch.gather(empty) for i in part), key={i: n for n, (i, _) in enumerate(prompts)}.get)
    return {"written": len(todo) - len(empty), "already_done": len(prompts) - len(todo), "empty": empty,
            "total": len(prompts)}


def _served(model) -> bool:
    from distillzoo.teacher.served import ServedTeacher

    return isinstance(model, ServedTeacher)


MODES = ("responses", "pairs")


def validate_generate(cfg, where: str = "<config>") -> None:
    """The ``generate`` section, checked before any model is loaded."""
    from distillzoo.data.records import data_format
    from distillzoo.errors import ConfigError, DistillzooError

    g = cfg.generate
    if g is None:
        raise ConfigError(f"{where}: generate: no 'generate' section (prompts, out, mode, sampling)")
    if g.mode not in MODES:
        raise ConfigError(f"{where}: generate.mode: {g.mode!r} is not one of {list(MODES)}")
    if g.model not in ("teacher", "student"):
        raise ConfigError(f"{where}: generate.model: {g.model!r} is not one of ['teacher', 'student']")
    roles = ("teacher", "student") if g.mode == "pairs" else (g.model,)
    from distillzoo.teacher.served import served_roles

    served = served_roles(cfg, roles, where)
    roles = tuple(role for role in roles if role not in served)  # the models loaded here
    for role in roles:
        require_model(cfg, role, f"generate (mode {g.mode})", where)
    from distillzoo.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(cfg.data.tokenizer if cfg.data is not None else None).vocab_size
    for role in roles:
        check_vocab(cfg, role, vocab, where)
    from distillzoo.data.tables import kind

    if g.prompts is None or kind(g.prompts) in (None, "prepared"):
        raise ConfigError(f"{where}: generate.prompts: {g.prompts!r} is not a records file (JSONL, JSON, Parquet, "
                          "Arrow) or a datasets save_to_disk directory")
    try:
        data_format(g.format)
    except DistillzooError as e:
        raise ConfigError(f"{where}: generate.format: {e}") from None
    if g.out is None:
        raise ConfigError(f"{where}: generate.out: give the JSONL file to write (a rerun appends what is missing)")
    try:
        Sampling(g.max_new_tokens, g.temperature, g.top_k, g.top_p, cfg.seed)
    except ParameterError as e:
        raise ConfigError(f"{where}: generate: {e}") from None
    if g.batch_size < 1:
        raise ConfigError(f"{where}: generate.batch_size must be >= 1, got {g.batch_size}")


def generate_from_config(cfg, where: str = "<config>") -> dict:
    """``distillzoo generate``: validate, load the models the mode needs, answer into ``generate.out`` (under
    torchrun, every rank its share)."""
    from distillzoo.data.tokenizer import load_tokenizer
    from distillzoo.teacher.served import served_client

    validate_generate(cfg, where)
    g = cfg.generate
    launch = Launch.from_env()
    roles = {"chosen": "teacher", "rejected": "student"} if g.mode == "pairs" else {"responses": g.model}
    data = cfg.data
    tokenizer = load_tokenizer(data.tokenizer if data is not None else None)
    models = {key: served_client(cfg[role], role, tokenizer, where) if cfg[role].server is not None else
              place_model(cfg[role], role, launch) for key, role in roles.items()}
    system = data.system if data is not None else QWEN_DEFAULT_SYSTEM
    return generate_file(models, tokenizer, g.prompts, g.format, g.out,
                         Sampling(g.max_new_tokens, g.temperature, g.top_k, g.top_p, cfg.seed),
                         mode=g.mode, system=system, batch_size=g.batch_size, progress=g.progress,
                         columns=None if g.columns is None else dict(g.columns), launch=launch)
