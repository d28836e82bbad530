"""``distillzoo compare``: entrants trained under one budget (each run in a child of a fork server), judged
on held-out metrics none of them trains on, and reported; ``distillzoo plot``'s curves.

May import: distillzoo.training, distillzoo.curate, distillzoo.teacher, distillzoo.config, distillzoo.objectives,
distillzoo.models, distillzoo.data, distillzoo.hooks, distillzoo.kernels, distillzoo.errors, distillzoo.atomic.
"""
