"""Damaged or malicious ``.nemo`` archives: refused with one line, nothing extracted or written."""

from __future__ import annotations

import gzip
import os
import tarfile
import time
import zlib
from pathlib import Path

import pytest
import yaml
from hostile_helpers import (
    CFG,
    assert_refused,
    copy,
    nemo_members,
    special_member,
    write_tar,
)

from ckptcore.formats import nemo as nemo_fmt
from ckptcore.sample import write_nemo


def members_of(templates, tp: int = 1) -> list[tuple[str, bytes]]:
    return list(nemo_members(templates.nemo_tp2 if tp == 2 else templates.nemo_tp1).items())


def config_bytes(**changes) -> bytes:
    cfg = dict(CFG, **changes)
    return yaml.safe_dump(cfg).encode()


def refuse(src: Path, out: Path, expected: str, *extra: str) -> None:
    assert_refused(["reshard", src, out, "--target-tp", "2", *extra], expected, out, (src,))


# --------------------------------------------------------------------------- escaping members


@pytest.mark.parametrize(
    "member, problem",
    [
        ("../escape.txt", "unsafe member '../escape.txt': path escapes the archive"),
        ("./a/../../escape.txt", "unsafe member './a/../../escape.txt': path escapes the archive"),
        ("/tmp/escape.txt", "unsafe member '/tmp/escape.txt': absolute path"),
    ],
)
def test_member_escaping_the_folder(templates, tmp_path, out, member, problem):
    src = write_tar(tmp_path / "evil.nemo", [*members_of(templates), (member, b"pwned")])
    refuse(src, out, f"{src}: {problem}")
    assert not (tmp_path.parent / "escape.txt").exists()


@pytest.mark.parametrize(
    "kind, linkname, problem",
    [
        (tarfile.SYMTYPE, "/etc/passwd", "links are not allowed"),
        (tarfile.LNKTYPE, "model_config.yaml", "links are not allowed"),
        (tarfile.CHRTYPE, "", "device or special file"),
        (tarfile.BLKTYPE, "", "device or special file"),
        (tarfile.FIFOTYPE, "", "device or special file"),
    ],
    ids=["symlink", "hardlink", "char-device", "block-device", "fifo"],
)
def test_links_and_devices(templates, tmp_path, out, kind, linkname, problem):
    evil = special_member("./extra/model_weights.ckpt", kind, linkname)
    src = write_tar(tmp_path / "evil.nemo", [*members_of(templates), evil])
    refuse(src, out, f"{src}: unsafe member './extra/model_weights.ckpt': {problem}")


def test_symlink_in_an_extracted_nemo_folder(templates, tmp_path, out):
    folder = tmp_path / "extracted"
    folder.mkdir()
    for name, data in members_of(templates):
        (folder / name.removeprefix("./")).write_bytes(data)
    (folder / "model_weights.ckpt").unlink()
    os.symlink("/etc/passwd", folder / "model_weights.ckpt")
    refuse(folder, out, f"{folder}: unsafe entry 'model_weights.ckpt': links are not allowed")


def test_symlinked_config_in_an_extracted_nemo_folder_is_not_read(templates, tmp_path, out):
    folder = tmp_path / "extracted"
    folder.mkdir()
    for name, data in members_of(templates):
        (folder / name.removeprefix("./")).write_bytes(data)
    secret = tmp_path / "secret.yaml"
    secret.write_bytes(config_bytes())
    (folder / "model_config.yaml").unlink()
    os.symlink(secret, folder / "model_config.yaml")
    refuse(folder, out, f"{folder}: unsafe entry 'model_config.yaml': links are not allowed")


def test_gzip_nemo_with_an_escaping_member(templates, tmp_path, out):
    src = tmp_path / "old.nemo"
    write_tar(src, [*members_of(templates), ("../escape.txt", b"x")], mode="w:gz")
    refuse(src, out, f"{src}: unsafe member '../escape.txt': path escapes the archive")
    assert not (tmp_path.parent / "escape.txt").exists()


# --------------------------------------------------------------------------- broken archives


def test_truncated_tar(templates, tmp_path, out):
    data = templates.nemo_tp1.read_bytes()
    src = tmp_path / "cut.nemo"
    src.write_bytes(data[: len(data) // 2])
    refuse(src, out, f"{src}: truncated archive: member model_weights.ckpt runs past the end")


def test_truncated_inside_a_header(templates, tmp_path, out):
    data = templates.nemo_tp1.read_bytes()
    src = tmp_path / "cut.nemo"
    src.write_bytes(data[:700])  # "./" header, then part of model_config.yaml's header
    refuse(src, out, f"{src}: truncated archive: it ends inside the member header at byte 512")


def test_zero_byte_nemo(tmp_path, out):
    src = tmp_path / "empty.nemo"
    src.write_bytes(b"")
    refuse(src, out, f"{src}: not a valid .nemo (tar) archive: empty file")


def test_truncated_gzip_nemo(templates, tmp_path, out):
    packed = gzip.compress(templates.nemo_tp1.read_bytes())
    src = tmp_path / "cut.nemo"
    src.write_bytes(packed[: len(packed) // 2])
    refuse(
        src,
        out,
        f"{src}: not a valid gzip .nemo archive: "
        "Compressed file ended before the end-of-stream marker was reached",
    )


def _gzip_member(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    return c.compress(data) + c.flush()


def test_gzip_bomb(tmp_path, out):
    """8 GiB of zeros in an 8 MiB file: refused from the tar headers, before inflating it."""
    config = config_bytes()
    info = tarfile.TarInfo("./model_config.yaml")
    info.size = len(config)
    head = info.tobuf(tarfile.PAX_FORMAT) + config + b"\0" * ((-len(config)) % 512)
    info = tarfile.TarInfo("./model_weights.ckpt")
    info.size = 8 << 30
    head += info.tobuf(tarfile.PAX_FORMAT)
    zeros = _gzip_member(b"\0" * (1 << 20))
    src = tmp_path / "bomb.nemo"
    with open(src, "wb") as f:
        f.write(_gzip_member(head))
        for _ in range(8 << 10):
            f.write(zeros)
    start = time.perf_counter()
    refuse(src, out, f"{src}: gzip archive expands beyond 1073741824 bytes (a gzip bomb?)")
    assert time.perf_counter() - start < 20


def test_gzip_bomb_made_of_many_members(tmp_path, out, monkeypatch):
    """Declared sizes add up: many modest members past the limit are refused too."""
    monkeypatch.setattr(nemo_fmt, "MAX_GZIP_FLOOR", 1 << 20)
    members = [("./model_config.yaml", config_bytes())]
    members += [(f"./junk/{i}.bin", b"\0" * (256 << 10)) for i in range(8)]
    src = write_tar(tmp_path / "bomb.nemo", members, mode="w:gz")
    limit = max(1 << 20, src.stat().st_size * nemo_fmt.MAX_GZIP_RATIO)
    refuse(src, out, f"{src}: gzip archive expands beyond {limit} bytes (a gzip bomb?)")


def test_not_a_tar(tmp_path, out):
    src = tmp_path / "notes.nemo"
    src.write_text("just some text\n" * 100)
    refuse(src, out, f"{src}: not a valid .nemo (tar) archive: invalid header")


# --------------------------------------------------------------------------- the config


def test_two_model_configs(templates, tmp_path, out):
    src = write_tar(
        tmp_path / "two.nemo", [*members_of(templates), ("model_config.yaml", config_bytes())]
    )
    refuse(src, out, f"{src}: archive has two members named model_config.yaml")


def test_two_model_configs_in_a_gzip_nemo(templates, tmp_path, out):
    src = tmp_path / "two.nemo"
    write_tar(src, [*members_of(templates), ("model_config.yaml", config_bytes())], mode="w:gz")
    refuse(src, out, f"{src}: archive has two members named model_config.yaml")


def test_missing_config(templates, tmp_path, out):
    members = [(n, d) for n, d in members_of(templates) if not n.endswith("model_config.yaml")]
    src = write_tar(tmp_path / "noconfig.nemo", members)
    refuse(src, out, f"{src}: not a .nemo archive: no model_config.yaml member")


def test_missing_config_in_a_gzip_nemo(templates, tmp_path, out):
    members = [(n, d) for n, d in members_of(templates) if not n.endswith("model_config.yaml")]
    src = write_tar(tmp_path / "noconfig.nemo", members, mode="w:gz")
    refuse(src, out, f"{src}: not a .nemo archive: no model_config.yaml member")


@pytest.mark.parametrize(
    "text, problem",
    [
        (b"hidden_size: [1, 2\n", "model_config.yaml is not valid YAML: while parsing a flow sequence"),
        (b"\xff\xfe\x00garbage", "model_config.yaml is not valid YAML: 'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
        (b"- just\n- a list\n", "model_config.yaml does not hold a mapping"),
        (b"a: &a [*a]\n", "model_config.yaml refers to itself at a[0]"),
        (b"hidden_size: !!python/object/apply:os.system ['touch pwned']\n", "model_config.yaml is not valid YAML: could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
        (b"1: one\n", "model_config.yaml has a non-string key 1"),
    ],
    ids=["syntax", "binary", "list", "recursive", "python-tag", "int-key"],
)  # fmt: skip
def test_unparsable_config(templates, tmp_path, out, text, problem):
    members = [
        (n, text if n.endswith("model_config.yaml") else d) for n, d in members_of(templates)
    ]
    src = write_tar(tmp_path / "badconfig.nemo", members)
    refuse(src, out, f"{src}: {problem}")
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_yaml_alias_bomb(templates, tmp_path, out):
    """'Billion laughs': aliases expanding to 10**12 values are refused, not walked."""
    lines = ['a0: ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 12)]
    lines[0] = lines[0].replace("a0: [", "a0: &a0 [")
    text = config_bytes() + ("\n".join(lines) + "\n").encode()
    members = [
        (n, text if n.endswith("model_config.yaml") else d) for n, d in members_of(templates)
    ]
    src = write_tar(tmp_path / "bomb.nemo", members)
    refuse(src, out, f"{src}: model_config.yaml holds more than 200000 values")


def test_config_contradicts_the_weights_hidden_size(templates, tmp_path, out):
    members = [
        (n, config_bytes(hidden_size=128) if n.endswith("model_config.yaml") else d)
        for n, d in members_of(templates)
    ]
    src = write_tar(tmp_path / "wrong.nemo", members)
    refuse(
        src,
        out,
        f"{src}: model.backbone.cls_token: full shape (1, 8, 64) does not match (1, 8, 128) "
        "implied by the config",
    )


@pytest.mark.parametrize(
    "tp, pp, expected",
    [
        (1, 1, "config says TP=1 PP=1 but the rank folders hold TP=2 PP=1"),
        (4, 1, "missing rank(s) mp_rank_02, mp_rank_03 of TP=4 PP=1 (per the config)"),
        (
            2,
            2,
            "missing rank(s) tp_rank_00_pp_rank_001, tp_rank_01_pp_rank_001 of TP=2 PP=2 "
            "(per the config)",
        ),
    ],
)
def test_config_parallelism_contradicts_the_rank_folders(
    templates, tmp_path, out, tp, pp, expected
):
    members = [
        (
            n,
            config_bytes(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            if n.endswith("model_config.yaml")
            else d,
        )
        for n, d in members_of(templates, tp=2)
    ]
    src = write_tar(tmp_path / "wrong.nemo", members)
    refuse(src, out, f"{src}: {expected}")


def test_the_same_rank_twice(templates, tmp_path, out):
    """mp_rank_00 and tp_rank_00_pp_rank_000 are both TP rank 0 of stage 0."""
    members = members_of(templates, tp=2)
    weights = dict(members)["./mp_rank_00/model_weights.ckpt"]
    members.append(("./tp_rank_00_pp_rank_000/model_weights.ckpt", weights))
    src = write_tar(tmp_path / "dup.nemo", members)
    refuse(
        src,
        out,
        f"{src}: rank tp=0 pp=0 is stored twice: mp_rank_00/model_weights.ckpt and "
        "tp_rank_00_pp_rank_000/model_weights.ckpt",
    )


def test_unexpected_weights_folder(templates, tmp_path, out):
    members = [*members_of(templates), ("./rank_7/model_weights.ckpt", b"x")]
    src = write_tar(tmp_path / "odd.nemo", members)
    refuse(src, out, f"{src}: unexpected weights file rank_7/model_weights.ckpt")


def test_good_archive_still_converts(templates, tmp_path, out):
    """Control: the untouched template passes the same command."""
    src = copy(templates.nemo_tp1, tmp_path / "good.nemo")
    from hostile_helpers import run_cli

    rc, _, err = run_cli("reshard", src, out, "--target-tp", "2")
    assert rc == 0, err
    fresh = tmp_path / "fresh.nemo"
    write_nemo(str(fresh), CFG, tp=2, state_dict=templates.state_dict)
    assert out.read_bytes() == fresh.read_bytes()
