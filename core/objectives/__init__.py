"""The objectives: the contracts a loss implements (logit-level, pointwise divergences, preference), weighted
mixtures, the sparse (top-k) teacher, the fused autograd machinery that takes the lm_head matmul and the
loss chunk by chunk, objectives by name, and the conformance kit (public as ``distillzoo.testing``).

May import: distillzoo.models, distillzoo.data, distillzoo.hooks, distillzoo.kernels, distillzoo.errors,
distillzoo.atomic.
"""
