"""Triton kernels for vocab-scale losses and their torch fallbacks.

Empty until the kernels land: the objectives' chunked torch paths live on the
base class (``distillzoo.base``) and are what every objective uses today.
"""
