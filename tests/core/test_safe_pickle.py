"""Checkpoints are pickles: nothing a file contains may run. Loading refuses every unknown global."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from ckptcore.errors import CkptError
from ckptcore.formats.safe_pickle import TORCH_SAFE_GLOBALS, TensorRef
from ckptcore.formats.torchzip import TorchFile
from ckptcore.sample import vit_config, write_training_checkpoint
from ckptcore.storage import LocalFile


class _RunsCode:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Evals:
    def __reduce__(self):
        return (eval, ("__import__('os').getcwd()",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_code_in_a_pickle_is_refused_and_does_not_run(tmp_path, payload: str) -> None:
    marker = tmp_path / "pwned"
    evil = _RunsCode(str(marker)) if payload == "system" else _Evals()
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": evil}, path)
    with pytest.raises(CkptError, match="refused to load global") as info:
        TorchFile(LocalFile(str(path)))
    assert str(path) in str(info.value)
    assert not marker.exists()


class _Exec:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        import builtins

        return (builtins.exec, (f"open({self.marker!r}, 'w').close()",))


class _Harmless:
    """An ordinary class from an unknown module: still refused (no imports of unknown modules)."""

    def __init__(self) -> None:
        self.value = 1


@pytest.mark.parametrize("kind", ["exec", "unknown_module"])
def test_exec_and_unknown_modules_are_refused(tmp_path, kind: str) -> None:
    marker = tmp_path / "ran"
    obj = _Exec(str(marker)) if kind == "exec" else _Harmless()
    path = tmp_path / "model_weights.ckpt"
    torch.save({"model.w": torch.zeros(1), "extra": obj}, path)
    expected = "builtins.exec" if kind == "exec" else "_Harmless"
    with pytest.raises(CkptError, match=expected):
        TorchFile(LocalFile(str(path)))
    assert not marker.exists()


def test_nemo_training_checkpoint_loads_with_allow_list_only(tmp_path) -> None:
    cfg = vit_config("tiny")
    name, _ = write_training_checkpoint(str(tmp_path), cfg)
    path = tmp_path / name
    tf = TorchFile(LocalFile(str(path)))
    assert isinstance(tf.obj["state_dict"]["model.backbone.cls_token"], TensorRef)
    # the optimizer state is only references: nothing was materialised
    assert isinstance(tf.obj["optimizer_states"][0]["state"][0]["exp_avg"], TensorRef)
    # torch's own weights_only loader agrees with the same allow-list ...
    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        ref = torch.load(path, weights_only=True, mmap=True)
    assert ref["hyper_parameters"]["cfg"]["hidden_size"] == 64
    # ... and refuses without it
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
