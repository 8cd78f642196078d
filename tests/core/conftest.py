from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from real_nemo import FIXTURES


@pytest.fixture(scope="session")
def fixtures() -> Path:
    """The real NeMo 2.3.2 files committed with the tests."""
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_forward(fixtures: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = json.loads((fixtures / "tiny_vit_tp1_forward.json").read_text())
    return torch.tensor(data["input"]), torch.tensor(data["logits"])
