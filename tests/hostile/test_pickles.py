"""Pickles that try to run code are refused before anything runs, in every container we read:
a Lightning ``.ckpt``, a ``.nemo``'s ``model_weights.ckpt`` and a Hub ``pytorch_model.bin``."""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import pytest
import torch
from hostile_helpers import (
    CFG,
    PAYLOAD_GLOBAL,
    UNKNOWN_MODULE_SOURCE,
    assert_proc_refused,
    assert_refused,
    ckpt_proc,
    copy,
    nemo_members,
    payload,
    save_with_payload,
    write_tar,
)
from omegaconf import OmegaConf

KINDS = list(PAYLOAD_GLOBAL)


@pytest.fixture
def marker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A file the payload would create; the unknown module is importable and would create it too."""
    path = tmp_path / "payload-ran"
    mod_dir = tmp_path / "payload_mod"
    mod_dir.mkdir()
    (mod_dir / "hostile_payload_mod.py").write_text(UNKNOWN_MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(mod_dir))
    monkeypatch.setenv("HOSTILE_MARKER", str(path))
    yield path
    assert not path.exists(), "the payload ran"
    assert "hostile_payload_mod" not in sys.modules, "the unknown module was imported"


def _lightning(sd: dict, evil) -> dict:
    return {
        "epoch": 1,
        "global_step": 100,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "callbacks": {"ModelCheckpoint": evil},
        "hyper_parameters": {"cfg": OmegaConf.create(CFG)},
    }


def evil_training_folder(templates, root: Path, kind: str, marker: Path) -> tuple[Path, Path]:
    folder = copy(templates.train_tp1, root / "train")
    path = folder / templates.train_name
    save_with_payload(_lightning(templates.state_dict, payload(kind, marker)), path)
    return folder, path


def evil_nemo(templates, root: Path, kind: str, marker: Path) -> Path:
    members = nemo_members(templates.nemo_tp1)
    sd = collections.OrderedDict(templates.state_dict)
    sd["model.backbone.evil"] = payload(kind, marker)
    weights = root / "model_weights.ckpt"
    save_with_payload(sd, weights)
    members["./model_weights.ckpt"] = weights.read_bytes()
    weights.unlink()
    return write_tar(root / "evil.nemo", list(members.items()))


def evil_hf_folder(templates, root: Path, kind: str, marker: Path) -> tuple[Path, Path]:
    from safetensors.torch import load_file

    folder = copy(templates.hf, root / "hf")
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    tensors["evil"] = payload(kind, marker)
    return folder, save_with_payload(tensors, folder / "pytorch_model.bin")


@pytest.mark.parametrize("kind", KINDS)
def test_lightning_ckpt(templates, tmp_path, out, marker, kind):
    folder, path = evil_training_folder(templates, tmp_path, kind, marker)
    assert_refused(
        ["convert", folder, out],
        f"{path}: unsafe or malformed pickle: refused to load global {PAYLOAD_GLOBAL[kind]}",
        out,
        (folder,),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_nemo_model_weights(templates, tmp_path, out, marker, kind):
    src = evil_nemo(templates, tmp_path, kind, marker)
    assert_refused(
        ["reshard", src, out, "--target-tp", "2"],
        f"{src}:model_weights.ckpt: unsafe or malformed pickle: "
        f"refused to load global {PAYLOAD_GLOBAL[kind]}",
        out,
        (src,),
    )


@pytest.mark.parametrize("kind", KINDS)
def test_hf_pytorch_model_bin(templates, tmp_path, out, marker, kind):
    folder, path = evil_hf_folder(templates, tmp_path, kind, marker)
    assert_refused(
        ["import-hf", folder, out],
        f"{path}: unsafe or malformed pickle: refused to load global {PAYLOAD_GLOBAL[kind]}",
        out,
        (folder,),
    )


@pytest.mark.parametrize("container", ["ckpt", "bin"])
def test_payload_does_not_run_in_a_real_process(templates, tmp_path, out, marker, container):
    """The same through ``python -m ckptcore.cli``: the payload module is importable there too."""
    if container == "ckpt":
        src, path = evil_training_folder(templates, tmp_path, "os.system", marker)
        argv = ["convert", src, out]
        global_name = "posix.system"
    else:
        src, path = evil_hf_folder(templates, tmp_path, "unknown module", marker)
        argv = ["import-hf", src, out]
        global_name = "hostile_payload_mod.Payload"
    env = {"PYTHONPATH": str(tmp_path / "payload_mod"), "HOSTILE_MARKER": str(marker)}
    proc = ckpt_proc(*argv, env=env)
    assert_proc_refused(
        proc, f"{path}: unsafe or malformed pickle: refused to load global {global_name}"
    )
    assert not os.path.exists(out) and os.listdir(out.parent) == []


def test_memory_bomb_constructors_are_refused(templates, tmp_path, out):
    """Allowed builtins that could allocate without bound (``bytearray(10**12)``) are refused."""

    class Bomb:
        def __reduce__(self):
            return (bytearray, (2**32,))

    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    torch.save(_lightning(templates.state_dict, Bomb()), path)
    assert_refused(
        ["convert", folder, out],
        f"{path}: unsafe or malformed pickle: builtins.bytearray may only copy bytes, "
        "not allocate 4294967296 of them",
        out,
        (folder,),
    )
