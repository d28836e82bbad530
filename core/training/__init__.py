"""``distillzoo train``: the run spec (the config resolved and checked once, before any model loads), the
loop, the training-algorithm contract, callbacks, the run directory and checkpoints, DDP/FSDP2, mixed data
streams, and LoRA students.

May import: distillzoo.teacher, distillzoo.config, distillzoo.objectives, distillzoo.models, distillzoo.data,
distillzoo.hooks, distillzoo.kernels, distillzoo.errors, distillzoo.atomic.
"""
