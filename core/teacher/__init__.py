"""The teacher side: answers from a model (generate), the top-k teacher cache, a served teacher's client and
the reference server it speaks to, the reference log-prob cache, sample scoring and filtering, held-out
evaluation, and the torchrun helpers that split their work over ranks and merge their outputs.

May import: distillzoo.config, distillzoo.objectives, distillzoo.models, distillzoo.data, distillzoo.hooks,
distillzoo.kernels, distillzoo.errors, distillzoo.atomic.
"""
