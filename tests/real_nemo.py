"""The real NeMo 2.3.2 files in ``tests/fixtures/nemo-2.3.2`` (see its README) and what the tests
derive from them. Every file there was written by NeMo itself, never by this project."""

from __future__ import annotations

import collections
import io
import json
import tarfile
from pathlib import Path
from typing import Any

import torch
import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nemo-2.3.2"
TRAINING = FIXTURES / "training"


MANIFEST: dict[str, Any] = json.loads((FIXTURES / "manifest.json").read_text())
RUNS: dict[str, dict[str, Any]] = {run["name"]: run for run in MANIFEST["training_runs"]}


def training_runs() -> list[str]:
    """The real training runs: folders with ``checkpoints/``, ``<name>.nemo``, ``expected.json``."""
    return list(RUNS)


def run_dir(name: str) -> Path:
    return FIXTURES / RUNS[name]["dir"]


def run_nemo(name: str) -> Path:
    """NeMo's ``save_to`` of the run's trained model."""
    return FIXTURES / RUNS[name]["nemo"]


def run_expected(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / RUNS[name]["expected"]).read_text())


def run_logits(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the fixed input, NeMo's logits after training) of a real training run."""
    data = run_expected(name)
    return torch.tensor(data["input"]), torch.tensor(data["logits_after_fit"])


def rank_files(name: str) -> list[Path]:
    return sorted((run_dir(name) / "checkpoints").rglob("*.ckpt"))


def standalone_nemo() -> list[str]:
    """The ``.nemo`` files NeMo wrote outside a training run (paths under FIXTURES)."""
    return [entry["path"] for entry in MANIFEST["standalone_nemo"]]


def standalone_logits(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the fixed input, NeMo's logits) of a standalone ``.nemo``."""
    entry = next(e for e in MANIFEST["standalone_nemo"] if e["path"] == path)
    data = json.loads((FIXTURES / entry["logits_file"]).read_text())
    logits = data["logits"]
    if isinstance(logits, dict):  # one file holding the logits of several models
        logits = logits[path.rsplit("/", 1)[-1]]["logits"]
    fixed = (
        data.get("input")
        or json.loads((FIXTURES / "tiny_vit_tp1_forward.json").read_text())["input"]
    )  # the files that leave it out were run on the same fixed input
    return torch.tensor(fixed), torch.tensor(logits)


def read_nemo(path: Path) -> tuple[bytes, dict[str, collections.OrderedDict]]:
    """(model_config.yaml bytes, {weights member: state dict}) of a ``.nemo`` written by NeMo."""
    with tarfile.open(path, "r:") as tar:
        config = tar.extractfile("./model_config.yaml").read()
        weights = {
            n: torch.load(io.BytesIO(tar.extractfile(n).read()), weights_only=True)
            for n in tar.getnames()
            if n.endswith("model_weights.ckpt")
        }
    return config, weights


def conv1_to_linear_encoder(sd: dict) -> collections.OrderedDict:
    """A state dict in NeMo 1.23's layout from a NeMo 2.x one, as NeMo 1.23's ``VitBackbone`` lays
    it out: ``linear_encoder`` (a Linear over patches flattened as ``(p1 p2 c)``, with a bias) in
    ``conv1``'s place. With a zero bias it computes exactly what ``conv1`` computed."""
    out: collections.OrderedDict = collections.OrderedDict()
    for key, value in sd.items():
        if key == "model.backbone.conv1.weight":
            hidden = value.shape[0]
            out["model.backbone.linear_encoder.weight"] = (
                value.permute(0, 2, 3, 1).reshape(hidden, -1).contiguous()
            )
            out["model.backbone.linear_encoder.bias"] = torch.zeros(hidden, dtype=value.dtype)
        else:
            out[key] = value
    return out


def write_nemo_123(source: Path, dest: Path) -> dict[str, Any]:
    """A ``.nemo`` as NeMo 1.23 writes it for the model of the real ``source``: the same config
    (NeMo 1.23's ViT config has the same keys and records no patch-embedding layout), its
    ``nemo_version``, and the weights in 1.23's ``linear_encoder`` layout. Returns the config."""
    config_bytes, weights = read_nemo(source)
    config = yaml.safe_load(config_bytes)
    config["nemo_version"] = "1.23.0"
    members = {"./model_config.yaml": yaml.safe_dump(config, sort_keys=False).encode()}
    for name, sd in weights.items():
        buf = io.BytesIO()
        torch.save(conv1_to_linear_encoder(sd), buf)
        members[name] = buf.getvalue()
    with tarfile.open(dest, "w:") as tar:
        for name in sorted(members, key=lambda n: (n.count("/"), n)):
            folder = name.rsplit("/", 1)[0]
            if folder != "." and folder not in tar.getnames():
                info = tarfile.TarInfo(folder)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    return config
