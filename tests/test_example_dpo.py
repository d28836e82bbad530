"""The DPO example runs end to end: cache, fused step equal to naive, the loss falls."""

import importlib.util
import math
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dpo_with_reference_cache.py"


def test_dpo_example_trains_from_the_cache(capsys):
    spec = importlib.util.spec_from_file_location("dpo_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(steps=3)
    history = result["history"]
    # the policy starts as the reference, so Delta = 0 and the sigmoid loss is log 2 exactly
    assert abs(result["naive_first_loss"] - math.log(2)) < 1e-6
    assert history[0]["loss"] == round(math.log(2), 4) and history[0]["rewards/margins"] == 0.0
    assert history[-1]["loss"] < history[0]["loss"] and history[-1]["rewards/margins"] > 0
    assert "4 pairs, reference log-probs cached for 4 ids" in capsys.readouterr().out
