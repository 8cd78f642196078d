"""The repartition engine: any TP/PP to any TP/PP, bit-exact, with checks before writing."""

from __future__ import annotations

import pytest
import torch
import yaml
from helpers import bitwise_equal, rank_state_dicts

from ckptcore.api import convert, load_state_dict
from ckptcore.errors import CkptError
from ckptcore.model.tp_forward import forward_tensor_parallel
from ckptcore.model.vit import VitClassificationModel
from ckptcore.plan import build_plan, split_ranges
from ckptcore.sample import random_state_dict, shard, vit_config, write_nemo
from ckptcore.sources import Checkpoint, open_checkpoint


def _chain(tmp_path, start: str, steps: list[tuple[int, int]]) -> str:
    current = start
    for i, (tp, pp) in enumerate(steps):
        nxt = str(tmp_path / f"step{i}_tp{tp}_pp{pp}.nemo")
        convert(current, nxt, target_tp=tp, target_pp=pp)
        with open_checkpoint(nxt) as ck:
            assert (ck.tp, ck.pp) == (tp, pp)
        current = nxt
    return current


@pytest.mark.parametrize(
    ("start", "steps"),
    [
        ((1, 1), [(2, 1), (4, 1), (1, 1)]),
        ((1, 1), [(1, 2), (1, 1)]),
        ((2, 2), [(4, 1), (1, 1)]),
        ((1, 1), [(4, 4), (2, 2), (1, 4), (1, 1)]),
    ],
)
def test_round_trips_are_bitwise_identical(tmp_path, start, steps) -> None:
    cfg = vit_config("tiny", layers=4)
    src = str(tmp_path / "src.nemo")
    full = write_nemo(src, cfg, tp=start[0], pp=start[1], seed=3)
    before = rank_state_dicts(src)
    end = _chain(tmp_path, src, steps + [start])
    assert rank_state_dicts(end).keys() == before.keys()
    for rank in before:
        assert bitwise_equal(rank_state_dicts(end)[rank], before[rank])
    _, merged = load_state_dict(end)
    assert bitwise_equal(merged, full)


def test_pipeline_stages_hold_the_right_tensors(tmp_path) -> None:
    cfg = vit_config("tiny", layers=4)
    src = str(tmp_path / "src.nemo")
    full = write_nemo(src, cfg)
    out = str(tmp_path / "pp2.nemo")
    convert(src, out, target_pp=2)
    ranks = rank_state_dicts(out)
    first, last = ranks[(0, 0)], ranks[(0, 1)]
    assert "model.backbone.cls_token" in first and "model.backbone.cls_token" not in last
    assert "model.head.dense_out.weight" in last and "model.head.dense_out.weight" not in first
    assert "model.backbone.transformer.final_layernorm.weight" in last
    # local layer numbers restart at 0 in each stage
    assert torch.equal(
        last["model.backbone.transformer.layers.0.input_layernorm.weight"],
        full["model.backbone.transformer.layers.2.input_layernorm.weight"],
    )
    assert not any(".layers.2." in k for k in last)


def test_uneven_layers_per_stage(tmp_path) -> None:
    cfg = vit_config("tiny", layers=5)
    src = str(tmp_path / "src.nemo")
    full = write_nemo(src, cfg)
    with pytest.raises(
        CkptError, match=r"does not divide num_layers=5; give --layers-per-stage \(e.g. 2,3\)"
    ):
        convert(src, str(tmp_path / "x.nemo"), target_pp=2)
    out = str(tmp_path / "pp2.nemo")
    convert(src, out, target_pp=2, layers_per_stage=[2, 3])
    ranks = rank_state_dicts(out)
    assert sum(1 for k in ranks[(0, 1)] if k.endswith("input_layernorm.weight")) == 3
    back = str(tmp_path / "back.nemo")
    convert(out, back, target_pp=1)
    assert bitwise_equal(load_state_dict(back)[1], full)


def test_legacy_qkv_round_trip_and_strided_split(tmp_path) -> None:
    cfg = vit_config("tiny", megatron_legacy=True)
    src = str(tmp_path / "legacy.nemo")
    full = write_nemo(src, cfg, seed=5)
    tp2 = str(tmp_path / "tp2.nemo")
    convert(src, tp2, target_tp=2)
    ranks = rank_state_dicts(tp2)
    key = "model.backbone.transformer.layers.0.self_attention.query_key_value.weight"
    q, k, v = full[key].chunk(3)
    assert torch.equal(ranks[(0, 0)][key], torch.cat([q.chunk(2)[0], k.chunk(2)[0], v.chunk(2)[0]]))
    back = str(tmp_path / "tp1.nemo")
    convert(tp2, back, target_tp=1)
    assert bitwise_equal(load_state_dict(back)[1], full)
    # and the shards compute what the full model computes
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = VitClassificationModel(cfg)
    model.load_state_dict(full)
    shards = [ranks[(t, 0)] for t in range(2)]
    assert torch.allclose(forward_tensor_parallel(cfg, shards, images), model(images), atol=1e-5)


def test_tensor_parallel_forward_from_resharded_fixture(
    fixtures, fixture_forward, tmp_path
) -> None:
    images, logits = fixture_forward
    out = str(tmp_path / "tp4.nemo")
    cfg = yaml.safe_load((fixtures / "tiny_vit_model_config.yaml").read_text())
    convert(str(fixtures / "tiny_vit_tp1.nemo"), out, target_tp=4)
    ranks = rank_state_dicts(out)
    shards = [ranks[(t, 0)] for t in range(4)]
    assert torch.allclose(forward_tensor_parallel(cfg, shards, images), logits, atol=1e-5)


def test_split_ranges_cover_exactly() -> None:
    assert split_ranges(8, 1, 2, 4, 1) == [(0, 2, 2)]
    assert split_ranges(8, 1, 4, 2, 1) == [(2, 0, 2), (3, 0, 2)]
    assert split_ranges(12, 3, 1, 2, 1) == [(0, 2, 2), (0, 6, 2), (0, 10, 2)]
    assert split_ranges(12, 3, 2, 1, 0) == [
        (0, 0, 2),
        (1, 0, 2),
        (0, 2, 2),
        (1, 2, 2),
        (0, 4, 2),
        (1, 4, 2),
    ]
    for full, groups in [(24, 1), (24, 3)]:
        for src in (1, 2, 4):
            for dst in (1, 2, 4):
                covered = sum(
                    n for r in range(dst) for _, _, n in split_ranges(full, groups, src, dst, r)
                )
                assert covered == full


def test_precision_cast_and_config(tmp_path) -> None:
    cfg = vit_config("tiny")
    src = str(tmp_path / "src.nemo")
    full = write_nemo(src, cfg)
    out = str(tmp_path / "bf16.nemo")
    convert(src, out, target_tp=2, precision="bf16")
    with open_checkpoint(out) as ck:
        config = ck.config
    _, sd = load_state_dict(out)
    assert config["precision"] == "bf16"
    assert config["tensor_model_parallel_size"] == 2 and config["pipeline_model_parallel_size"] == 1
    assert all(v.dtype == torch.bfloat16 for v in sd.values() if v is not None)
    assert torch.equal(
        sd["model.head.dense_out.weight"], full["model.head.dense_out.weight"].to(torch.bfloat16)
    )
    # everything else in the config is kept
    assert {
        k: v for k, v in config.items() if k not in ("precision", "tensor_model_parallel_size")
    } == {k: v for k, v in cfg.items() if k not in ("precision", "tensor_model_parallel_size")}


@pytest.mark.parametrize(
    ("tp", "pp", "message"),
    [
        (3, 1, "target TP=3 does not divide num_attention_heads=4"),
        (8, 1, "target TP=8 does not divide num_attention_heads=4"),
        (1, 3, "PP=3 is more stages than the model's 2 layer"),
    ],
)
def test_bad_targets_are_refused_before_writing(tmp_path, tp, pp, message) -> None:
    src = str(tmp_path / "src.nemo")
    write_nemo(src, vit_config("tiny"))
    dest = tmp_path / "out.nemo"
    with pytest.raises(CkptError, match=message):
        convert(src, str(dest), target_tp=tp, target_pp=pp)
    assert not dest.exists() and list(tmp_path.iterdir()) == [tmp_path / "src.nemo"]


def test_replicas_must_agree(tmp_path) -> None:
    cfg = vit_config("tiny", tensor_model_parallel_size=2)
    shards = shard(cfg, random_state_dict(cfg), 2, 1)
    shards[(1, 0)]["model.backbone.transformer.layers.1.input_layernorm.bias"] += 1e-3
    ck = Checkpoint.from_state_dicts(cfg, shards, url="src")
    with pytest.raises(
        CkptError,
        match=r"replicated tensor differs between ranks \(tp=0, pp=0\) and \(tp=1, pp=0\)",
    ):
        from ckptcore.engine import materialize

        materialize(ck, build_plan(ck, 1, 1).files[0])


def test_shapes_are_checked_against_the_config(tmp_path) -> None:
    cfg = vit_config("tiny")
    sd = random_state_dict(cfg)
    wrong = dict(cfg, ffn_hidden_size=128)
    ck = Checkpoint.from_state_dicts(wrong, {(0, 0): sd}, url="src")
    with pytest.raises(
        CkptError,
        match=r"mlp.dense_h_to_4h.weight: full shape \(256, 64\) does not match \(128, 64\)",
    ):
        build_plan(ck, 2, 1)


def test_unknown_keys_are_listed(tmp_path) -> None:
    cfg = vit_config("tiny")
    sd = random_state_dict(cfg)
    sd["model.backbone.mystery.weight"] = torch.zeros(3)
    ck = Checkpoint.from_state_dicts(cfg, {(0, 0): sd}, url="src")
    with pytest.raises(CkptError, match="does not know: model.backbone.mystery.weight"):
        build_plan(ck, 2, 1)


def test_nonfinite_weights_refused_unless_allowed(tmp_path) -> None:
    cfg = vit_config("tiny")
    sd = random_state_dict(cfg)
    sd["model.head.dense_in.bias"][3] = float("nan")
    src = str(tmp_path / "nan.nemo")
    write_nemo(src, cfg, state_dict=sd)
    with pytest.raises(CkptError, match="NaN or Inf"):
        convert(src, str(tmp_path / "out.nemo"), target_tp=2)
    assert not (tmp_path / "out.nemo").exists()
    convert(src, str(tmp_path / "out.nemo"), target_tp=2, allow_nonfinite=True)


def test_parallel_workers_give_identical_files(tmp_path) -> None:
    cfg = vit_config("tiny", layers=4)
    src = str(tmp_path / "src.nemo")
    write_nemo(src, cfg)
    a, b = str(tmp_path / "a.nemo"), str(tmp_path / "b.nemo")
    convert(src, a, target_tp=2, target_pp=2, workers=1)
    convert(src, b, target_tp=2, target_pp=2, workers=4)
    ra, rb = rank_state_dicts(a), rank_state_dicts(b)
    assert all(bitwise_equal(ra[r], rb[r]) for r in ra)
