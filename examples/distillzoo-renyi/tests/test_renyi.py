import math

import pytest
import torch

import distillzoo as dz
from distillzoo.testing import CHECKS
from distillzoo_renyi import Renyi

ALPHA = 0.3


def reference(student_logits, teacher_logits, labels):
    """Renyi divergence written straight from its definition, float64."""
    p = torch.softmax(teacher_logits, dim=-1)
    q = torch.softmax(student_logits, dim=-1)
    return torch.log((p**ALPHA * q ** (1 - ALPHA)).sum(-1)) / (ALPHA - 1)


@pytest.mark.parametrize("check", sorted(CHECKS))
def test_conformance(check):
    if check == "reference":
        CHECKS[check](Renyi, reference, {"alpha": ALPHA})
    else:
        CHECKS[check](Renyi, {"alpha": ALPHA})


def test_hand_computed_value():
    # p = (1/2, 1/2), q = (1/4, 3/4), alpha = 1/2: D = -2 log(sqrt(1/8) + sqrt(3/8))
    teacher = torch.log(torch.tensor([[0.5, 0.5]], dtype=torch.float64))
    student = torch.log(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    loss = Renyi(alpha=0.5)(student, teacher, torch.tensor([0]))
    assert loss.item() == pytest.approx(-2 * math.log(math.sqrt(1 / 8) + math.sqrt(3 / 8)), rel=1e-12)


def test_selected_by_name_with_validated_params():
    assert "renyi" in dz.list_objectives()
    assert dz.objective("renyi", alpha=0.25).alpha == 0.25
    with pytest.raises(dz.ParameterError, match=r"'alpha' = 1.5 is out of range \(0, 1\)"):
        dz.objective("renyi", alpha=1.5)
