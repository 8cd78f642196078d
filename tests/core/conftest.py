from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "nemo-2.3.2"


@pytest.fixture(scope="session")
def fixtures() -> Path:
    assert FIXTURES.is_dir(), f"NeMo fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def fixture_forward(fixtures: Path) -> tuple[torch.Tensor, torch.Tensor]:
    data = json.loads((fixtures / "tiny_vit_tp1_forward.json").read_text())
    return torch.tensor(data["input"]), torch.tensor(data["logits"])
