"""``ckptcore.api.verify``: bit-identical tensors are compared, anything else is run.

A repartition keeps every tensor bit for bit, so running the source model too could only repeat
the output model's logits; verify then compares the tensors (``same-weights``). Any difference
in a tensor's bits, dtype or the network its config builds sends it back to running both
models (``logits``), where the tolerance decides.
"""

from __future__ import annotations

import torch

from ckptcore import api
from ckptcore.sample import vit_config, write_nemo


def _source(tmp_path, **config) -> tuple[str, dict, dict]:
    cfg = dict(vit_config("tiny"), **config)
    path = str(tmp_path / "a.nemo")
    sd = write_nemo(path, cfg)
    return path, cfg, sd


def test_repartition_is_compared_by_its_tensors(tmp_path) -> None:
    a, _, _ = _source(tmp_path)
    b = str(tmp_path / "b.nemo")
    api.convert(a, b, target_tp=2)
    report = api.verify(a, b, images=2)
    assert (report.method, report.max_abs_diff, report.passed) == ("same-weights", 0.0, True)
    both = api.verify(a, b, images=2, run_both=True)
    assert (both.method, both.max_abs_diff, both.passed) == ("logits", 0.0, True)


def test_one_ulp_off_runs_both_models(tmp_path) -> None:
    a, cfg, sd = _source(tmp_path)
    key = "model.head.dense_out.weight" if "model.head.dense_out.weight" in sd else None
    key = key or next(k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.dim() == 2)
    nudged = dict(sd)
    w = sd[key].clone()
    w.view(-1)[0] = torch.nextafter(w.view(-1)[0], torch.tensor(float("inf")))
    nudged[key] = w
    b = str(tmp_path / "b.nemo")
    write_nemo(b, cfg, tp=2, state_dict=nudged)
    report = api.verify(a, b, images=2)
    assert report.method == "logits"
    assert report.passed and report.max_abs_diff < 1e-5


def test_same_weights_other_network_runs_both_models(tmp_path) -> None:
    a, cfg, sd = _source(tmp_path)
    b = str(tmp_path / "b.nemo")
    write_nemo(b, dict(cfg, layernorm_epsilon=0.5), state_dict=sd)
    report = api.verify(a, b, images=2)
    assert report.method == "logits"
    assert not report.passed and report.max_abs_diff > 1e-5


def test_other_weights_fail(tmp_path) -> None:
    a, cfg, _ = _source(tmp_path)
    b = str(tmp_path / "b.nemo")
    write_nemo(b, cfg, seed=9)
    report = api.verify(a, b, images=2)
    assert report.method == "logits" and not report.passed


def test_precision_change_runs_both_models(tmp_path) -> None:
    a, _, _ = _source(tmp_path)
    b = str(tmp_path / "b.nemo")
    api.convert(a, b, precision="bf16")
    report = api.verify(a, b, images=2, tolerance=1.0)
    assert report.method == "logits" and report.passed and report.max_abs_diff > 0
