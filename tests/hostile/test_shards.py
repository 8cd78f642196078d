"""Rank files that do not add up: missing, doubled, from two saves, inconsistent, damaged."""

from __future__ import annotations

import collections
import io
import math
import shutil
from pathlib import Path

import pytest
import torch
from hostile_helpers import CFG, assert_refused, copy, nemo_members, run_cli, write_tar

from ckptcore.api import load_state_dict
from ckptcore.sample import write_training_checkpoint

L0 = "model.backbone.transformer.layers.0."


def edit_ckpt(path: Path, fn) -> None:
    """Load one of our own template files, change it, save it back (same name)."""
    obj = torch.load(path, weights_only=False)
    fn(obj)
    torch.save(obj, path)


def convert_refused(src: Path, out: Path, expected: str, *extra: str) -> None:
    assert_refused(["convert", src, out, *extra], expected, out, (src,))


@pytest.fixture
def train2(templates, tmp_path) -> tuple[Path, str]:
    return copy(templates.train_tp2, tmp_path / "train"), templates.train_name


# --------------------------------------------------------------------------- which ranks


def test_missing_rank(train2, out):
    folder, name = train2
    (folder / "mp_rank_01" / name).unlink()
    convert_refused(
        folder, out, f"{folder}: missing rank(s) mp_rank_01 of TP=2 PP=1 (per the config)"
    )


def test_missing_rank_in_a_nemo(templates, tmp_path, out):
    members = [(n, d) for n, d in nemo_members(templates.nemo_tp2).items() if "mp_rank_01" not in n]
    src = write_tar(tmp_path / "partial.nemo", members)
    convert_refused(src, out, f"{src}: missing rank(s) mp_rank_01 of TP=2 PP=1 (per the config)")


def test_duplicated_rank(train2, out):
    folder, name = train2
    (folder / "tp_rank_00_pp_rank_000").mkdir()
    shutil.copy(folder / "mp_rank_00" / name, folder / "tp_rank_00_pp_rank_000" / name)
    convert_refused(folder, out, f"{folder}: checkpoint {name} mixes rank layouts (mp, tp_pp)")


def test_duplicated_rank_in_an_extracted_nemo(templates, tmp_path, out):
    folder = tmp_path / "extracted"
    for name, data in nemo_members(templates.nemo_tp2).items():
        path = folder / name.removeprefix("./")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (folder / "tp_rank_01_pp_rank_000").mkdir()
    shutil.copy(
        folder / "mp_rank_01" / "model_weights.ckpt",
        folder / "tp_rank_01_pp_rank_000" / "model_weights.ckpt",
    )
    convert_refused(
        folder,
        out,
        f"{folder}: rank tp=1 pp=0 is stored twice: mp_rank_01/model_weights.ckpt and "
        "tp_rank_01_pp_rank_000/model_weights.ckpt",
    )


def test_ranks_from_two_checkpoints(templates, train2, tmp_path, out):
    folder, name = train2
    later = tmp_path / "later"
    later_name, _ = write_training_checkpoint(
        str(later), CFG, tp=2, step=200, state_dict=templates.state_dict
    )
    shutil.copy(later / "mp_rank_01" / later_name, folder / "mp_rank_01" / name)
    convert_refused(
        folder,
        out,
        f"{folder}: ranks come from different checkpoints: step 100 in "
        f"{folder}/mp_rank_00/{name}, step 200 in {folder}/mp_rank_01/{name}",
    )


def test_unfinished_save(train2, out):
    folder, name = train2
    (folder / (name.removesuffix(".ckpt") + "-unfinished")).touch()
    convert_refused(folder, out, f"{folder}: no finished -last.ckpt checkpoint (found: {name})")


# --------------------------------------------------------------------------- what ranks hold


def test_shapes_inconsistent_across_tp_ranks(train2, out):
    folder, name = train2
    key = L0 + "self_attention.dense.weight"
    path = folder / "mp_rank_01" / name
    edit_ckpt(path, lambda o: o["state_dict"].__setitem__(key, torch.zeros(64, 16)))
    convert_refused(
        folder,
        out,
        f"{path}: {key}: shape/dtype (64, 16) float32 differs from tp rank 0's (64, 32) float32",
    )


def test_dtype_inconsistent_across_tp_ranks(train2, out):
    folder, name = train2
    key = L0 + "input_layernorm.weight"
    path = folder / "mp_rank_01" / name
    edit_ckpt(path, lambda o: o["state_dict"].__setitem__(key, o["state_dict"][key].half()))
    convert_refused(
        folder,
        out,
        f"{path}: {key}: shape/dtype (64,) float16 differs from tp rank 0's (64,) float32",
    )


def test_replicated_tensor_differs_across_ranks(train2, out):
    folder, name = train2
    key = L0 + "input_layernorm.weight"
    edit_ckpt(folder / "mp_rank_01" / name, lambda o: o["state_dict"][key].add_(1e-3))
    convert_refused(
        folder,
        out,
        f"{folder}: {key}: replicated tensor differs between ranks (tp=0, pp=0) and (tp=1, pp=0)",
    )


def test_replicated_tensor_corrupted_in_a_local_nemo(templates, tmp_path, out):
    """One bit of a replicated tensor flipped in rank 0's record; its stored CRC unchanged."""
    members = nemo_members(templates.nemo_tp2)
    name = "./mp_rank_00/model_weights.ckpt"
    data = bytearray(members[name])
    key = "model.backbone.transformer.final_layernorm.weight"
    ref = collections.OrderedDict(torch.load(io.BytesIO(bytes(data)), weights_only=True))
    raw = ref[key].numpy().tobytes()
    at = data.find(raw)
    assert at > 0
    data[at] ^= 1
    members[name] = bytes(data)
    src = write_tar(tmp_path / "rot.nemo", list(members.items()))
    convert_refused(
        src,
        out,
        f"{src}: {key}: replicated tensor differs between ranks (tp=0, pp=0) and (tp=1, pp=0)",
        "--target-tp",
        "1",
    )


def test_keys_the_rule_table_does_not_know(train2, out):
    folder, name = train2

    def add(o):
        sd = o["state_dict"]
        for i in range(10):
            sd[f"model.backbone.mystery{i}.weight"] = torch.zeros(2)

    for rank in ("mp_rank_00", "mp_rank_01"):
        edit_ckpt(folder / rank / name, add)
    listed = ", ".join(f"model.backbone.mystery{i}.weight" for i in range(8))
    convert_refused(
        folder,
        out,
        f"{folder}: keys the megatron_vit rule table does not know: {listed} (and 2 more)",
    )


def test_keys_differ_across_ranks(train2, out):
    folder, name = train2
    path = folder / "mp_rank_01" / name
    edit_ckpt(path, lambda o: o["state_dict"].pop(L0 + "input_layernorm.bias"))
    convert_refused(
        folder,
        out,
        f"{path}: keys differ from {folder}/mp_rank_00/{name}: "
        f"missing ['{L0}input_layernorm.bias']",
    )


def test_layer_numbers_with_a_gap(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name

    def renumber(o):
        sd = o["state_dict"]
        o["state_dict"] = collections.OrderedDict(
            (k.replace("layers.1.", "layers.3."), v) for k, v in sd.items()
        )

    edit_ckpt(path, renumber)
    convert_refused(folder, out, f"{path}: layer numbers [0, 3] do not run 0..1")


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nonfinite_weights(templates, tmp_path, out, value):
    folder = copy(templates.train_tp1, tmp_path / "train")
    key = L0 + "mlp.dense_h_to_4h.weight"
    edit_ckpt(
        folder / templates.train_name, lambda o: o["state_dict"][key].view(-1)[7].fill_(value)
    )
    convert_refused(
        folder,
        out,
        f"{folder}: {key}: holds NaN or Inf values (pass --allow-nonfinite to keep them)",
    )
    rc, _, err = run_cli("convert", folder, out, "--allow-nonfinite", "--target-tp", "2")
    assert rc == 0, err
    _, sd = load_state_dict(str(out))
    got = sd[key].view(-1)[7].item()
    assert (math.isnan(got) and math.isnan(value)) or got == value


def test_nonfinite_in_a_cast(templates, tmp_path, out):
    """A float32 weight that overflows to Inf when cast to float16 is caught too."""
    folder = copy(templates.train_tp1, tmp_path / "train")
    key = L0 + "mlp.dense_h_to_4h.weight"
    edit_ckpt(folder / templates.train_name, lambda o: o["state_dict"][key].view(-1)[3].fill_(1e6))
    convert_refused(
        folder,
        out,
        f"{folder}: {key}: float32 values overflow float16 (pass --allow-nonfinite to keep Inf)",
        "--precision",
        "16",
    )


# --------------------------------------------------------------------------- damaged files


def test_truncated_ckpt(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    path.write_bytes(path.read_bytes()[:5000])
    convert_refused(folder, out, f"{path}: truncated zip archive: no central directory at the end")


def test_truncated_ckpt_tail(templates, tmp_path, out):
    """Cut inside the central directory: the end record is gone, the start looks fine."""
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    data = path.read_bytes()
    path.write_bytes(data[:-30])
    convert_refused(folder, out, f"{path}: truncated zip archive: no central directory at the end")


def test_zero_byte_ckpt(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    path.write_bytes(b"")
    convert_refused(
        folder, out, f"{path}: not a torch checkpoint: 0 bytes is too small (truncated?)"
    )


def test_non_zip_ckpt(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    path.write_bytes(b"this is not a zip file\n" * 100)
    convert_refused(folder, out, f"{path}: not a torch checkpoint (no zip directory found)")


def test_legacy_torch_format(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    obj = torch.load(templates.train_tp1 / templates.train_name, weights_only=False)
    torch.save(obj, path, _use_new_zipfile_serialization=False)
    convert_refused(folder, out, f"{path}: legacy (pre-1.6, non-zip) torch format is not supported")


def test_truncated_weights_inside_a_nemo(templates, tmp_path, out):
    members = nemo_members(templates.nemo_tp1)
    members["./model_weights.ckpt"] = members["./model_weights.ckpt"][:-100]
    src = write_tar(tmp_path / "cut.nemo", list(members.items()))
    convert_refused(
        src,
        out,
        f"{src}:model_weights.ckpt: truncated zip archive: no central directory at the end",
    )


def test_storage_record_shorter_than_its_tensor(templates, tmp_path, out):
    """A pickle that claims more elements than the stored record holds."""
    members = nemo_members(templates.nemo_tp1)
    data = bytearray(members["./model_weights.ckpt"])
    # cls_token: (1, 8, 64) float32 = 512 elements; claim 4096 in its persistent id
    needle = b"cpuq\x07M\x00\x02"
    at = data.find(needle)
    assert at > 0
    data[at : at + len(needle)] = needle[:-2] + (4096).to_bytes(2, "little")
    members["./model_weights.ckpt"] = bytes(data)
    src = write_tar(tmp_path / "short.nemo", list(members.items()))
    convert_refused(
        src,
        out,
        f"{src}:model_weights.ckpt: storage record data/0 has 2048 bytes, expected 16384",
    )


def test_not_a_lightning_checkpoint(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    torch.save({"weights": torch.zeros(2)}, path)
    convert_refused(folder, out, f"{path}: not a Lightning checkpoint (no state_dict)")


def test_lightning_checkpoint_without_a_config(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    edit_ckpt(path, lambda o: o.pop("hyper_parameters"))
    convert_refused(
        folder, out, f"{path}: no hyper_parameters in the checkpoint: it holds no model config"
    )


def test_tensor_in_the_config(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    edit_ckpt(
        path, lambda o: o.__setitem__("hyper_parameters", {"cfg": dict(CFG, seed=torch.ones(1))})
    )
    convert_refused(folder, out, f"{path}: hyper_parameters holds a TensorRef value at cfg.seed")


def test_non_tensor_value_in_the_state_dict(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name
    edit_ckpt(path, lambda o: o["state_dict"].__setitem__("model.backbone.cls_token", [1, 2]))
    convert_refused(
        folder, out, f"{path}: model.backbone.cls_token: unexpected list value in the state dict"
    )


def test_metadata_that_is_not_a_mapping(templates, tmp_path, out):
    folder = copy(templates.train_tp1, tmp_path / "train")
    path = folder / templates.train_name

    def damage(o):
        o["state_dict"]._metadata = ["not", "a", "mapping"]

    edit_ckpt(path, damage)
    convert_refused(folder, out, f"{path}: the state dict's _metadata is not a mapping of mappings")
