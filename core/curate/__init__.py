"""Data curation before any loss: ``distillzoo curate`` runs a pipeline of named stages (plugins registered
through ``register_curation_stages``: dedup, decontaminate, quality built in) over instruction or preference
records, each stage's output written shard by shard and atomically, so a killed run resumes where it stopped.

May import: distillzoo.data, distillzoo.hooks, distillzoo.config, distillzoo.errors, distillzoo.atomic.
"""
