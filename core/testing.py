"""The conformance kit for objectives, importable as ``distillzoo.testing``.

It lives in :mod:`distillzoo.objectives.conformance`; this module is its public name::

    from distillzoo.testing import check_objective
    check_objective(MyObjective, reference)
"""

from distillzoo.objectives.conformance import *  # noqa: F401,F403
from distillzoo.objectives.conformance import __all__  # noqa: F401
