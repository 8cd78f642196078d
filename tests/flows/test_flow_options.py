"""Flow parameters that the other flow tests leave at their defaults do what their docs say.

Local folders only (no S3), tiny models, the Prefect test harness. Each run is compared with
another run that differs in the parameter: the step taken for ``checkpoint``, the dtypes for
``precision``, the verdict for ``tolerance`` and ``verify``, the keys for ``layout``, and so on.
"""

from __future__ import annotations

import json
import os
import tarfile

import pytest
import torch

from ckptcore.errors import CkptError
from ckptcore.sample import vit_config, write_nemo
from ckptcore.sources import open_checkpoint
from flows.convert import convert_vit
from flows.import_hf import import_hf_vit
from flows.repartition import repartition_vit
from flows.reshard import reshard_vit
from flows.routes import ConvertJob
from flows.sweep import sweep_vit
from tasks import settings

pytestmark = pytest.mark.usefixtures("prefect_api", "work_dir")

# export-hf takes it (one class token, the finetune head): also the source of the HF folder.
CFG = dict(class_token_length=1, finetune=True)


@pytest.fixture(autouse=True)
def _one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CKPT_STAGING_URL", "CKPT_SCRATCH_URL"):
        monkeypatch.delenv(name, raising=False)


def _dtypes(nemo: str) -> set[torch.dtype]:
    with open_checkpoint(nemo) as ck:
        return {
            sr.tensor(k).dtype
            for sr in ck.ranks.values()
            for k, v in sr.state.items()
            if v is not None and sr.tensor(k).is_floating_point()
        }


def _keys(nemo: str) -> set[str]:
    with open_checkpoint(nemo) as ck:
        return {k for sr in ck.ranks.values() for k in sr.state}


def _failure(state) -> str:
    assert state.is_failed(), state
    with pytest.raises(Exception) as info:
        state.result()
    return str(info.value)


@pytest.fixture
def two_checkpoints(tmp_path, sample_factory):
    """A TP=2 training folder: step 100 (``-last``) and step 200 (not last, other weights)."""
    first = sample_factory(None, None, tp=2, step=100, **CFG)
    sample_factory(None, None, local=first.local, tp=2, step=200, last=False, seed=1, **CFG)
    return first.local


def test_convert_checkpoint_precision_verify_tolerance(two_checkpoints, tmp_path) -> None:
    src, out = two_checkpoints, tmp_path / "out"
    default = convert_vit(source=src, destination=str(out / "a.nemo"))
    assert (default["step"], default["precision"], default["verify-passed"]) == (
        "100",
        "32",
        "true",
    )
    latest = convert_vit(source=src, destination=str(out / "b.nemo"), checkpoint="latest")
    assert latest["step"] == "200"
    # bf16 weights: logits move by more than the default tolerance (1e-5) ...
    state = convert_vit(
        source=src, destination=str(out / "c.nemo"), precision="bf16", return_state=True
    )
    assert "verify failed" in _failure(state) and not (out / "c.nemo").exists()
    # ... but not by more than 1
    loose = convert_vit(source=src, destination=str(out / "d.nemo"), precision="bf16", tolerance=1)
    assert (loose["precision"], loose["verify-passed"]) == ("bf16", "true")
    assert 1e-5 < float(loose["verify-max-abs-diff"]) < 1
    assert _dtypes(str(out / "d.nemo")) == {torch.bfloat16}
    # verify=False: no comparison at all, so the bf16 output is published as it is
    unchecked = convert_vit(
        source=src, destination=str(out / "e.nemo"), precision="bf16", verify=False
    )
    assert "verify-passed" not in unchecked and (out / "e.nemo").exists()
    record = json.loads((out / "e.nemo.lineage.json").read_text())
    assert record["verify"] is None


def test_convert_overwrite(two_checkpoints, tmp_path) -> None:
    dest = tmp_path / "taken.nemo"
    dest.write_bytes(b"someone else's model")
    state = convert_vit(source=two_checkpoints, destination=str(dest), return_state=True)
    assert "exists" in _failure(state) and dest.read_bytes() == b"someone else's model"
    summary = convert_vit(source=two_checkpoints, destination=str(dest), overwrite=True)
    assert summary["step"] == "100" and tarfile.is_tarfile(dest)


def test_convert_scratch_url_is_where_mapped_items_stage(two_checkpoints, tmp_path) -> None:
    """With staged items the work items write under ``scratch_url`` (no CKPT_STAGING_URL)."""
    scratch = tmp_path / "scratch"
    convert_vit(
        source=two_checkpoints,
        destination=str(tmp_path / "a.nemo"),
        target_tp=1,
        runner="threads",
        assemble="staged",
        scratch_url=str(scratch),
        verify=False,
    )
    assert scratch.is_dir()  # the staging folder (its items are removed once packaged)
    record = json.loads((tmp_path / "a.nemo.lineage.json").read_text())
    assert any("work items" in n for n in record["notes"])


def test_reshard_target_pp_precision_verify_overwrite_tolerance(tmp_path) -> None:
    """``reshard`` hands its parameters on by position: each lands where it belongs."""
    src = str(tmp_path / "model.nemo")
    write_nemo(src, vit_config("tiny", **CFG))
    dest = tmp_path / "out.nemo"
    dest.write_bytes(b"old")
    summary = reshard_vit(
        source=src,
        destination=str(dest),
        target_pp=2,
        precision="bf16",
        verify=False,
        overwrite=True,
    )
    assert (summary["target-layout"], summary["precision"]) == ("tp1-pp2", "bf16")
    assert "verify-passed" not in summary and _dtypes(str(dest)) == {torch.bfloat16}
    state = reshard_vit(
        source=src, destination=str(dest), precision="bf16", overwrite=True, return_state=True
    )
    assert "verify failed" in _failure(state)
    summary = reshard_vit(
        source=src, destination=str(dest), precision="bf16", overwrite=True, tolerance=1.0
    )
    assert summary["verify-passed"] == "true" and summary["target-layout"] == "tp1-pp1"


def test_sweep_target_pp_precision_verify(tmp_path, sample_factory) -> None:
    root = tmp_path / "runs"
    sample = sample_factory(None, None, local=str(root / "run-a" / "checkpoints"), tp=2, **CFG)
    dests = tmp_path / "models"
    states = sweep_vit(
        training_prefix=str(root),
        destination_prefix=str(dests),
        target_tp=2,
        target_pp=2,
        precision="bf16",
        verify=False,  # bf16 logits would fail the default tolerance
    )
    (dest,) = states
    assert states[dest] == "Completed"
    assert dest == str(dests / "run-a" / "checkpoints" / sample.name.replace(".ckpt", ".nemo"))
    record = json.loads(open(dest + ".lineage.json").read())
    assert (record["target_tp"], record["target_pp"], record["precision"]) == (2, 2, "bf16")
    assert record["verify"] is None and _dtypes(dest) == {torch.bfloat16}


def test_sweep_tolerance(tmp_path, sample_factory) -> None:
    """A precision change verifies within the tolerance given, and fails the default one."""
    root = tmp_path / "runs"
    sample_factory(None, None, local=str(root / "run-a" / "checkpoints"), tp=2, **CFG)
    states = sweep_vit(
        training_prefix=str(root), destination_prefix=str(tmp_path / "ok"), precision="bf16",
        tolerance=0.1,
    )  # fmt: skip
    (dest,) = states
    record = json.loads(open(dest + ".lineage.json").read())
    assert states[dest] == "Completed" and record["verify"]["passed"]
    assert record["verify"]["tolerance"] == 0.1 and record["verify"]["max_abs_diff"] > 1e-5
    with pytest.raises(RuntimeError, match="1 of 1 conversions failed"):
        sweep_vit(
            training_prefix=str(root), destination_prefix=str(tmp_path / "strict"), precision="bf16"
        )


@pytest.fixture
def hf_folder(tmp_path) -> str:
    """A transformers ViT folder: a tiny sample ``.nemo`` exported by ``export_hf``."""
    from ckptcore.community import export_hf

    nemo = str(tmp_path / "src.nemo")
    write_nemo(nemo, vit_config("tiny", **CFG))
    folder = str(tmp_path / "hf")
    export_hf(nemo, folder)
    return folder


def test_import_hf_layout_source_kind_target_pp_precision_tolerance(hf_folder, tmp_path) -> None:
    a, b = str(tmp_path / "conv1.nemo"), str(tmp_path / "linear.nemo")
    default = import_hf_vit(source=hf_folder, destination=a)
    assert (default["target-layout"], default["precision"]) == ("tp1-pp1", "32")
    summary = import_hf_vit(
        source=hf_folder,
        destination=b,
        target_pp=2,
        layout="linear_encoder",
        source_kind="transformers",
        precision="bf16",
        tolerance=1.0,
    )
    assert (summary["target-layout"], summary["precision"]) == ("tp1-pp2", "bf16")
    assert summary["verify-passed"] == "true" and float(summary["verify-max-abs-diff"]) > 1e-5
    assert _dtypes(b) == {torch.bfloat16}
    assert "model.backbone.conv1.weight" in _keys(a) - _keys(b)
    assert "model.backbone.linear_encoder.weight" in _keys(b) - _keys(a)
    state = import_hf_vit(
        source=hf_folder, destination=str(tmp_path / "c.nemo"), source_kind="timm",
        return_state=True,
    )  # fmt: skip
    assert "architecture" in _failure(state)


def test_import_hf_overwrite_and_verify(hf_folder, tmp_path) -> None:
    dest = tmp_path / "out.nemo"
    dest.write_bytes(b"old")
    state = import_hf_vit(source=hf_folder, destination=str(dest), return_state=True)
    assert "exists" in _failure(state) and dest.read_bytes() == b"old"
    state = import_hf_vit(
        source=hf_folder, destination=str(dest), overwrite=True, precision="bf16",
        return_state=True,
    )  # fmt: skip
    assert "verify failed" in _failure(state) and dest.read_bytes() == b"old"
    summary = import_hf_vit(
        source=hf_folder, destination=str(dest), overwrite=True, precision="bf16", verify=False
    )
    assert "verify-passed" not in summary and _dtypes(str(dest)) == {torch.bfloat16}


def test_repartition_parameters(two_checkpoints, tmp_path) -> None:
    """The deployment's flow, called directly: checkpoint, target layout, precision, digest."""
    src = two_checkpoints
    out = tmp_path / "partition"
    manifest = repartition_vit(
        source=src,
        output_url=str(out),
        checkpoint="latest",
        target_tp=1,
        target_pp=2,
        precision="bf16",
    )
    assert (manifest["step"], manifest["target_tp"], manifest["target_pp"]) == (200, 1, 2)
    assert manifest["precision"] == "bf16" and os.path.isfile(out / "partition.json")
    default = repartition_vit(source=src, output_url=str(tmp_path / "p2"))
    assert (default["step"], default["target_tp"], default["precision"]) == (100, 2, "32")
    same = repartition_vit(
        source=src, output_url=str(tmp_path / "p3"), source_digest=default["source_digest"]
    )
    assert same["source_digest"] == default["source_digest"]
    state = repartition_vit(
        source=src, output_url=str(tmp_path / "p4"), source_digest="0" * 64, return_state=True
    )
    assert "source changed since it was listed" in _failure(state)


@pytest.mark.parametrize(
    "choice, destination, route",
    [
        ({}, "/models/a.nemo", "inline"),
        ({}, "s3://models/a.nemo", "stream"),
        ({"upload": "after"}, "s3://models/a.nemo", "inline"),
        ({"runner": "threads:2"}, "s3://models/a.nemo", "assembled"),
        ({"runner": "dask", "assemble": "staged"}, "s3://models/a.nemo", "mapped"),
        ({"runner": "ray"}, "/models/a.nemo", "assembled"),
        ({"runner": "inline"}, "/models/a.nemo", "inline"),
    ],
)
def test_convert_parameters_choose_the_route(choice, destination, route) -> None:
    job = ConvertJob("s3://training/run/checkpoints", **choice)
    assert job.route(destination, None) == route
    assert not job.hands_off()  # not deployed, repartition=auto: this run repartitions


def test_repartition_deployment_hands_off_unless_mapped() -> None:
    assert ConvertJob("src", repartition="deployment").hands_off()
    assert not ConvertJob("src", repartition="deployment", runner="dask").hands_off()
    assert not ConvertJob("src", repartition="inline").hands_off()
    for name, value in (
        ("repartition", "gpu"),
        ("upload", "later"),
        ("source_read", "mmap"),
        ("verify_process", "child"),
        ("assemble", "later"),
    ):
        with pytest.raises(CkptError, match=f"{name}='{value}': expected"):
            ConvertJob("src", **{name: value})


def test_convert_path_parameters_are_refused_or_kept_in_the_lineage(
    two_checkpoints, tmp_path, monkeypatch
) -> None:
    """A bad choice fails the run before any work; the choices and the worker's settings are
    in the lineage record."""
    dest = tmp_path / "a.nemo"
    state = convert_vit(
        source=two_checkpoints, destination=str(dest), upload="later", return_state=True
    )
    assert "upload" in _failure(state) and not dest.exists()
    state = convert_vit(
        source=two_checkpoints, destination=str(dest), runner="spark", return_state=True
    )
    assert "runner 'spark'" in _failure(state) and not dest.exists()
    monkeypatch.setenv("CKPT_UPLOAD_CONCURRENCY", "3")
    choices = dict(repartition="inline", upload="after", source_read="download")
    convert_vit(source=two_checkpoints, destination=str(dest), verify_process="inline", **choices)
    record = json.loads((tmp_path / "a.nemo.lineage.json").read_text())
    assert {k: record["run"]["parameters"][k] for k in choices} == choices
    assert record["run"]["parameters"]["verify_process"] == "inline"
    assert record["settings"]["upload_concurrency"] == 3
    assert record["settings"]["read_concurrency"] == 4
    assert set(record["settings"]) >= set(settings.PipelineSettings.model_fields)
