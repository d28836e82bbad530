"""Vocab-scale ops: Triton kernels (CUDA), the vocab-chunked torch path (CPU), and the dispatch between them.

* :mod:`.backend`: which implementation runs (``DISTILLZOO_BACKEND=triton|torch|reference``).
* :mod:`.vocab_chunked`: the torch path, O(rows x chunk) temporaries.
* :mod:`.divergence`, :mod:`.cross_entropy`, :mod:`.dpkd_token`, :mod:`.token_logprob_triton`:
  Triton kernels, imported on first use so that ``TRITON_INTERPRET`` is read then.
* :func:`token_logprobs`: fused per-token log-probs (and entropy) from hidden states.

The objectives reach these through ``LogitObjective.loss_and_grad`` (``distillzoo.base``).
"""

from .token_logprob import token_logprobs

__all__ = ["token_logprobs"]
