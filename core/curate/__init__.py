"""Data curation before any loss: ``distillzoo curate`` runs a pipeline of named stages (plugins registered
through ``register_curation_stages``; built in: dedup, decontaminate, quality, balance, and the model stages
tag, score, expand, rewrite) over instruction or preference records, each stage's output written shard by
shard and atomically, so a killed run resumes where it stopped, and reports the data's distributions before
and after.

May import: distillzoo.teacher, distillzoo.data, distillzoo.models, distillzoo.hooks, distillzoo.config,
distillzoo.errors, distillzoo.atomic.
"""
