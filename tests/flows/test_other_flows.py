"""``sweep``, ``reshard`` and ``import-hf`` against moto and the Prefect test harness."""

from __future__ import annotations

import json

import pytest
import torch

from ckptcore.api import load_state_dict
from ckptcore.lineage import LineageRecord
from flows.import_hf import import_hf_vit
from flows.reshard import reshard_vit
from flows.sweep import sweep_vit

pytestmark = pytest.mark.usefixtures("prefect_api")


def _record(s3, dest: str) -> LineageRecord:
    return LineageRecord.from_json(s3.cat_file(f"{dest}.lineage.json".removeprefix("s3://")))


def test_sweep_converts_each_finished_checkpoint_once(
    s3, tmp_path, work_dir, prefix, sample_factory
):
    root = f"s3://ckpt-training/{prefix}"
    run_a = sample_factory(s3, f"{root}/run-a/checkpoints", tp=2, step=100)
    run_b_local = str(tmp_path / "run-b" / "checkpoints")
    done = sample_factory(s3, None, local=run_b_local, tp=1, step=10, last=False)
    saving = sample_factory(s3, None, local=run_b_local, tp=1, step=20, last=False, unfinished=True)
    s3.put(run_b_local + "/", f"ckpt-training/{prefix}/run-b/checkpoints/", recursive=True)
    dest_root = f"s3://ckpt-models/{prefix}"

    first = sweep_vit(training_prefix=root + "/", destination_prefix=dest_root)
    stem_a = run_a.name.removesuffix(".ckpt")
    stem_b = done.name.removesuffix(".ckpt")
    assert first == {
        f"{dest_root}/run-a/checkpoints/{stem_a}.nemo": "Completed",
        f"{dest_root}/run-b/checkpoints/{stem_b}.nemo": "Completed",
    }
    rec = _record(s3, f"{dest_root}/run-a/checkpoints/{stem_a}.nemo")
    assert (rec.source, rec.checkpoint, rec.source_tp, rec.target_tp) == (
        f"{root}/run-a/checkpoints",
        run_a.name,
        2,
        1,
    )

    assert sweep_vit(training_prefix=root + "/", destination_prefix=dest_root) == {}

    # The unfinished save completes (marker gone): the next sweep converts it alone.
    marker = saving.name.removesuffix(".ckpt") + "-unfinished"
    s3.rm_file(f"ckpt-training/{prefix}/run-b/checkpoints/{marker}")
    third = sweep_vit(training_prefix=root + "/", destination_prefix=dest_root)
    assert list(third.values()) == ["Completed"]
    assert "step=20" in next(iter(third))


def test_reshard_nemo_to_tp2_in_s3(s3, tmp_path, work_dir, prefix):
    from ckptcore.sample import vit_config, write_nemo

    local = str(tmp_path / "model.nemo")
    sd = write_nemo(local, vit_config("tiny"), tp=1)
    src = f"s3://ckpt-models/{prefix}/model.nemo"
    dest = f"s3://ckpt-models/{prefix}/model-tp2.nemo"
    s3.put_file(local, src.removeprefix("s3://"))

    summary = reshard_vit(source=src, destination=dest, target_tp=2)

    from ckptcore.api import inspect

    assert (inspect(dest)["tp"], inspect(dest)["pp"]) == (2, 1)
    _, out = load_state_dict(dest)
    for key, value in sd.items():
        if value is not None:
            assert torch.equal(out[key], value), key
    rec = _record(s3, dest)
    assert (rec.source_tp, rec.target_tp, rec.step) == (1, 2, None)
    assert rec.source_files[0].url == src
    assert summary["target-layout"] == "tp2-pp1"


def test_reshard_refuses_a_training_folder(s3, work_dir, prefix, sample_factory):
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    sample_factory(s3, src, tp=1)
    state = reshard_vit(
        source=src, destination=f"s3://ckpt-models/{prefix}/x.nemo", return_state=True
    )
    assert state.is_failed()
    with pytest.raises(Exception, match="is a ptl checkpoint; expected nemo or nemo-dir"):
        state.result()


def test_import_hf_folder_from_s3(s3, tmp_path, work_dir, prefix):
    """A transformers ViT folder in S3 -> a TP=2 .nemo whose logits match transformers."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=5,
    )
    model = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.1)
    folder = tmp_path / "hf-vit"
    model.save_pretrained(folder)
    src = f"s3://ckpt-training/{prefix}/hf-vit"
    dest = f"s3://ckpt-models/{prefix}/hf-vit-tp2.nemo"
    s3.put(str(folder) + "/", src.removeprefix("s3://") + "/", recursive=True)

    import_hf_vit(source=src, destination=dest, target_tp=2)

    from ckptcore.model.vit import VitClassificationModel

    local = str(tmp_path / "imported.nemo")
    s3.get_file(dest.removeprefix("s3://"), local)
    nemo = VitClassificationModel.restore_from(local)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (nemo(images) - model(pixel_values=images).logits).abs().max().item()
    assert diff <= 1e-5
    rec = _record(s3, dest)
    assert rec.target_tp == 2 and rec.verify is not None and rec.verify.passed
    assert {f.url.rsplit("/", 1)[-1] for f in rec.source_files} >= {
        "config.json",
        "model.safetensors",
    }
    import tarfile

    with tarfile.open(local) as tar:
        names = tar.getnames()
        member = json.loads(tar.extractfile("./lineage.json").read())
    assert "./mp_rank_01/model_weights.ckpt" in names
    assert member["source"] == src
