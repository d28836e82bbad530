"""Data on its way to the models: tables (JSONL, JSON, Parquet, Arrow, datasets directories), records
through a data format, Qwen's ChatML tokenizer, instruction examples and their batches, preference pairs,
int32 token shards, and the quickstart's task set.

May import: distillzoo.hooks, distillzoo.kernels, distillzoo.errors, distillzoo.atomic.
"""
