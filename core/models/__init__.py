"""Causal LMs as distillzoo uses them: tiny Qwen2-architecture models built from a config, local models
loaded (and placed over GPUs, CPU and disk), final hidden states and the lm_head, response log-probs,
and decoding (greedy or sampled, seeded per sample id).

May import: distillzoo.data, distillzoo.hooks, distillzoo.kernels, distillzoo.errors, distillzoo.atomic.
"""
