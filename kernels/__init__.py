"""Vocab-scale ops: Triton kernels (CUDA), the vocab-chunked torch path (CPU), and the dispatch between them.

* :mod:`.backend`: which implementation runs (``DISTILLZOO_BACKEND=triton|torch|reference``).
* :mod:`.vocab_chunked`: the torch path, O(rows x chunk) temporaries.
* :mod:`.divergence`, :mod:`.cross_entropy`, :mod:`.dpkd_token`, :mod:`.token_logprob_triton`:
  Triton kernels, imported on first use so that ``TRITON_INTERPRET`` is read then.
* :func:`token_logprobs`: fused per-token log-probs (and entropy) from hidden states.

The objectives reach these through ``LogitObjective.loss_and_grad`` (``distillzoo.objectives.logit``).
"""

if __name__ == "kernels":
    # This folder is distillzoo.kernels. Imported as a top-level "kernels", a checkout's root is on sys.path
    # (python -m or -c run from it) and shadows the PyPI package of that name, which transformers imports:
    # load that package in its place, or fail as any missing module does.
    import importlib.util as _util
    import sys as _sys
    from importlib.metadata import PackageNotFoundError as _Missing
    from importlib.metadata import distribution as _distribution

    try:
        _init = _distribution("kernels").locate_file("kernels/__init__.py")
    except _Missing:
        raise ModuleNotFoundError("No module named 'kernels' (this folder is distillzoo.kernels)",
                                  name="kernels") from None
    _spec = _util.spec_from_file_location("kernels", _init, submodule_search_locations=[str(_init.parent)])
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module  # what the import statement returns
    _spec.loader.exec_module(_module)
else:
    from distillzoo.kernels.token_logprob import token_logprobs

    __all__ = ["token_logprobs"]
