"""``ckptcore.sample`` writes what NeMo 2.3.2 writes: held to every real training run.

The real files are loaded with ``weights_only=False`` here only because they are the project's own
committed fixtures, written by NeMo; the product never does that.
"""

from __future__ import annotations

import re
import sys
import types

import pytest
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from real_nemo import FIXTURES, rank_files, run_expected, training_runs

from ckptcore import sample
from ckptcore.api import convert, inspect
from ckptcore.errors import CkptError

RUNS = training_runs()
NAME_RE = re.compile(
    r"^megatron_vit_classification--val_loss=\d+\.\d\d-step=\d+-consumed_samples=\d+\.\d+(-last)?\.ckpt$"
)


def _structure(value):
    """Types all the way down, tensors as dtype and rank (values and sizes left out)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), value.dim())
    if isinstance(value, dict):
        return (type(value).__name__, {str(k): _structure(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return (type(value).__name__, [_structure(v) for v in value])
    return type(value).__name__


def _real_config(run: str) -> dict:
    ck = torch.load(rank_files(run)[0], weights_only=False)
    return OmegaConf.to_container(ck["hyper_parameters"])["cfg"]


def _sample_like(tmp_path, run: str) -> tuple[dict, dict, str]:
    """A sample checkpoint for the model of a real run: (real rank 0, sample rank 0, file name)."""
    real = torch.load(rank_files(run)[0], weights_only=False)
    cfg = OmegaConf.to_container(real["hyper_parameters"])["cfg"]
    tp = run_expected(run)["tp"]
    name, _ = sample.write_training_checkpoint(
        str(tmp_path), cfg, tp=tp, step=real["global_step"], epoch=real["epoch"]
    )
    written = sorted(tmp_path.rglob(name))
    return real, torch.load(written[0], weights_only=False), name


@pytest.mark.parametrize("run", RUNS)
def test_sample_training_checkpoint_has_the_real_structure(tmp_path, run: str) -> None:
    real, ours, name = _sample_like(tmp_path, run)
    assert list(ours) == list(real)  # the same top-level keys, in the same order
    for key in real:
        assert type(ours[key]) is type(real[key]), key
    assert type(ours["hyper_parameters"]) is DictConfig
    assert list(ours["hyper_parameters"]) == ["cfg"]
    assert list(ours["state_dict"]) == list(real["state_dict"])
    for key in ("loops", "callbacks", "optimizer_states", "lr_schedulers"):
        assert _structure(ours[key]) == _structure(real[key]), key
    assert NAME_RE.match(name) and NAME_RE.match(run_expected(run)["checkpoint"])
    # the rank folders are NeMo's
    real_layout = sorted(p.parent.name for p in rank_files(run))
    ours_layout = sorted(p.parent.name for p in tmp_path.rglob(name))
    assert ours_layout == [n if n.startswith("mp_rank") else tmp_path.name for n in real_layout]


def test_sample_config_has_the_real_keys() -> None:
    real = yaml.safe_load((FIXTURES / "tiny_vit_model_config.yaml").read_text())
    assert list(sample.vit_config()) == list(real)
    for run in RUNS:  # a run's config is NeMo's plus the keys its command line overrode
        overridden = set(run_expected(run)["overrides"])
        real = set(_real_config(run))
        assert set(sample.vit_config()) <= real and real - set(sample.vit_config()) <= overridden


# ------------------------------------------------------------ hyper_parameters as writers save it


def _rewrite(tmp_path, run: str, hyper_parameters) -> str:
    """The real run's rank files with ``hyper_parameters`` replaced; the folder's URL."""
    out = tmp_path / "checkpoints"
    for path in rank_files(run):
        ck = torch.load(path, weights_only=False)
        ck["hyper_parameters"] = hyper_parameters(ck["hyper_parameters"])
        rel = path.relative_to(
            path.parents[1] if path.parent.name != "checkpoints" else path.parent
        )
        dest = out / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        torch.save(ck, dest)
    return str(out)


def _attribute_dict_class() -> type:
    """A class that pickles as Lightning's ``AttributeDict`` (Lightning is not installed here)."""
    name = "lightning.pytorch.utilities.parsing"
    module = sys.modules.get(name) or types.ModuleType(name)
    cls = type("AttributeDict", (dict,), {"__module__": name})
    module.AttributeDict = cls
    for part in ("lightning", "lightning.pytorch", "lightning.pytorch.utilities", name):
        sys.modules.setdefault(part, types.ModuleType(part))
    sys.modules[name] = module
    return cls


HP_FORMS = {
    "dictconfig": lambda hp: hp,
    "dict-holding-dictconfig": lambda hp: {"cfg": hp.cfg},
    "plain-dict": lambda hp: OmegaConf.to_container(hp),
    "attribute-dict": lambda hp: _attribute_dict_class()(cfg=OmegaConf.to_container(hp.cfg)),
    "flat": lambda hp: OmegaConf.to_container(hp.cfg),
}


@pytest.mark.parametrize("form", list(HP_FORMS))
def test_config_found_in_every_form_of_hyper_parameters(tmp_path, form: str) -> None:
    run = "tp2_a"
    folder = _rewrite(tmp_path, run, HP_FORMS[form])
    assert inspect(folder)["config"]["hidden_size"] == _real_config(run)["hidden_size"]
    report = convert(folder, str(tmp_path / "out.nemo"), target_tp=1)
    assert report.layout.source_tp == 2


@pytest.mark.parametrize(
    ("hyper_parameters", "problem"),
    [
        (lambda hp: None, "no hyper_parameters in the checkpoint"),
        (
            lambda hp: {"lr": 0.1},
            "no model config in hyper_parameters (no 'cfg' entry; it holds lr)",
        ),
        (lambda hp: [1, 2], "hyper_parameters is a list, not a mapping"),
    ],
)
def test_checkpoint_without_a_config_is_refused(tmp_path, hyper_parameters, problem) -> None:
    folder = _rewrite(tmp_path, "tp2_a", hyper_parameters)
    with pytest.raises(CkptError) as err:
        inspect(folder)
    assert problem in str(err.value)
    assert "mp_rank_00" in str(err.value)  # names the file


def test_training_state_real_runs_leave_is_read(tmp_path) -> None:
    """What a run with NeMo's exp_manager, an LR schedule and fp16 loss scaling adds to each rank
    file: checkpoint-callback state (paths, scores as tensors), a scheduler state, the grad
    scaler's state under the precision plugin's name. None of it stops a conversion."""
    state = {
        "NeMoModelCheckpoint{'monitor': 'val_loss', 'mode': 'min', 'every_n_train_steps': None, "
        "'every_n_epochs': 1, 'train_time_interval': None}": {
            "monitor": "val_loss",
            "best_model_score": torch.tensor(0.25),
            "best_model_path": "/results/checkpoints/megatron_vit--val_loss=0.25-step=2.ckpt",
            "current_score": torch.tensor(0.25),
            "dirpath": "/results/checkpoints",
            "best_k_models": {"/results/checkpoints/a.ckpt": torch.tensor(0.25)},
            "kth_best_model_path": "/results/checkpoints/a.ckpt",
            "kth_value": torch.tensor(float("inf")),
            "last_model_path": "",
        },
        "EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {
            "wait_count": 0,
            "stopped_epoch": 0,
            "best_score": torch.tensor(0.25),
            "patience": 3,
        },
    }

    def add_state(ck_path) -> None:
        ck = torch.load(ck_path, weights_only=False)  # a committed fixture written by NeMo
        ck["callbacks"] = state
        ck["lr_schedulers"] = [
            {"base_lrs": [1e-3, 1e-3], "last_epoch": 2, "_step_count": 3, "_last_lr": [1e-3]}
        ]
        ck["PipelineMixedPrecisionPlugin"] = {
            "scale": torch.tensor(65536.0),
            "growth_factor": 2.0,
            "backoff_factor": 0.5,
            "growth_interval": 1000,
            "_growth_tracker": torch.tensor(2, dtype=torch.int32),
            "_hysteresis_tracker": 2,
        }
        torch.save(ck, ck_path)

    folder = tmp_path / "checkpoints"
    for path in rank_files("tp2_a"):
        dest = folder / path.parent.name / path.name
        dest.parent.mkdir(parents=True)
        dest.write_bytes(path.read_bytes())
        add_state(dest)
    convert(str(folder), str(tmp_path / "out.nemo"), target_tp=1)
