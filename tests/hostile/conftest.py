"""Fixtures of the hostile-input suite: valid templates, made once per session and copied per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hostile_helpers import CFG

from ckptcore.sample import vit_config, write_nemo, write_training_checkpoint


class Templates:
    """Valid checkpoints to copy and damage; never modified themselves."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.nemo_tp1 = root / "tp1.nemo"
        self.nemo_tp2 = root / "tp2.nemo"
        self.train_tp1 = root / "train_tp1"
        self.train_tp2 = root / "train_tp2"
        self.hf = root / "hf"
        self.state_dict = write_nemo(str(self.nemo_tp1), CFG)
        write_nemo(str(self.nemo_tp2), CFG, tp=2, state_dict=self.state_dict)
        self.train_name, _ = write_training_checkpoint(
            str(self.train_tp1), CFG, state_dict=self.state_dict
        )
        write_training_checkpoint(str(self.train_tp2), CFG, tp=2, state_dict=self.state_dict)
        self.hf_nemo = root / "hf_source.nemo"
        write_nemo(str(self.hf_nemo), vit_config("tiny", class_token_length=1, finetune=True))
        from ckptcore.community.api import export_hf

        export_hf(str(self.hf_nemo), str(self.hf))


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Templates:
    return Templates(tmp_path_factory.mktemp("templates"))


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """The destination of the test's conversion, in a folder of its own (checked for leftovers)."""
    folder = tmp_path / "out"
    folder.mkdir()
    return folder / "model.nemo"


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and region for s3fs (any values do for moto)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
