"""The teacher-side commands that fill a cache: ``distillzoo cache-teacher`` (a model's or a server's top-k per
response token) and ``distillzoo reference-cache`` (a frozen reference's log-probs per preference pair). The
command line parses their arguments; these functions run them."""

from __future__ import annotations

from distillzoo.errors import ConfigError


def reference_cache(args, columns: dict | None) -> int:
    """``distillzoo reference-cache``: the frozen reference's log-probs of every pair, once."""
    from distillzoo.models.causal_lm import load_causal_lm
    from distillzoo.data.pairs import PreferenceDataset
    from distillzoo.teacher.launch import Launch
    from distillzoo.teacher.reference_cache import write_reference_cache
    from distillzoo.data.tokenizer import load_tokenizer

    data = PreferenceDataset(args.data, load_tokenizer(args.tokenizer), max_length=args.max_length,
                             max_prompt_length=args.max_prompt_length, columns=columns)
    launch = Launch.from_env()
    model = load_causal_lm(args.model, dtype=args.dtype, device=launch.device(args.device), max_memory=args.max_memory,
                           gpus=launch.gpus())
    cache = write_reference_cache(args.out, model, data, batch_size=args.batch_size, model_name=args.model,
                                  launch=launch)
    if launch.main:
        print(f"wrote reference log-probs of {len(cache)} pairs under {args.model} to {args.out}")
    return 0


def cache_teacher(args, columns: dict | None) -> int:
    """``distillzoo cache-teacher``: a teacher's top-k over instruction data, from a model or a server."""
    from pathlib import Path

    from distillzoo.models.causal_lm import load_causal_lm
    from distillzoo.teacher.launch import Launch
    from distillzoo.data.shards import ConversationDataset, TokenShards
    from distillzoo.data.tables import kind
    from distillzoo.teacher.cache import write_teacher_cache
    from distillzoo.data.tokenizer import QWEN_DEFAULT_SYSTEM, load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    if len(args.data) == 1 and kind(args.data[0]) == "prepared":
        dataset, name = TokenShards(args.data[0]), args.data[0]
    else:
        if args.format is None:
            raise ConfigError("--format is needed for records (JSONL, Parquet, a datasets directory, ...)")
        dataset = ConversationDataset(args.data, args.format, tokenizer, max_length=args.max_length,
                                      system=None if args.no_system else QWEN_DEFAULT_SYSTEM, columns=columns)
        name = ",".join(args.data)
    launch = Launch.from_env()
    served = args.model.startswith(("http://", "https://"))
    if served:  # a served teacher: its top-k from the server
        from distillzoo.teacher.served import ServedTeacher, check_served

        model = ServedTeacher(args.model, args.served_model, top_k=args.k, api=args.api)
        check_served(model, tokenizer, f"cache-teacher {args.model}")
    else:
        model = load_causal_lm(args.model, dtype=args.model_dtype, device=launch.device(args.device),
                               max_memory=args.max_memory, gpus=launch.gpus())
    cache = write_teacher_cache(args.out, model, dataset, k=args.k, temperature=args.temperature, dtype=args.dtype,
                                teacher_name=model.model if served else args.model, tokenizer_name=tokenizer.name,
                                pad_id=tokenizer.pad_id, data_name=name, batch_size=args.batch_size, launch=launch,
                                shard_size=args.shard_size, progress=not args.no_progress, vocab_size=args.vocab_size)
    if not launch.main:
        return 0
    tokens = sum(int(s.offsets[-1]) for s in cache.shards)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*.bin"))
    print(f"cached the top-{args.k} of {cache.manifest['teacher']} for {len(cache)} samples, {tokens} response tokens, "
          f"{size / max(tokens, 1):.0f} bytes per token, in {args.out}")
    return 0
