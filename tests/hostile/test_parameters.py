"""Parameters that cannot work with the source, and destinations that must not be written."""

from __future__ import annotations

import os
import tarfile

import pytest
from hostile_helpers import CFG, assert_refused, copy, run_cli

from ckptcore.sample import vit_config, write_nemo


@pytest.fixture
def src(templates, tmp_path):
    return copy(templates.nemo_tp1, tmp_path / "model.nemo")


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--target-tp", "3"], "target TP=3 does not divide num_attention_heads=4"),
        (["--target-pp", "3"], "PP=3 is more stages than the model's 2 layer(s)"),
        (["--layers-per-stage", "1,2"], "--layers-per-stage [1, 2] sums to 3, model has 2 layers"),
        (["--layers-per-stage", "2,0"], "--layers-per-stage needs positive counts, got [2, 0]"),
        (
            ["--layers-per-stage", "1,1", "--target-pp", "3"],
            "--layers-per-stage has 2 stages, --target-pp is 3",
        ),
    ],
    ids=["tp-heads", "pp-layers", "stages-sum", "stages-zero", "stages-vs-pp"],
)
def test_target_layout_that_does_not_fit(src, out, args, problem):
    assert_refused(["reshard", src, out, *args], f"{src}: {problem}", out, (src,))


def test_target_tp_not_dividing_ffn(tmp_path, out):
    src = tmp_path / "odd_ffn.nemo"
    write_nemo(str(src), vit_config("tiny", ffn=250))
    assert_refused(
        ["reshard", src, out, "--target-tp", "4"],
        f"{src}: target TP=4 does not divide ffn_hidden_size=250",
        out,
        (src,),
    )


def test_unknown_precision(src, out):
    assert_refused(
        ["reshard", src, out, "--precision", "fp8"],
        "--precision: unknown precision 'fp8' (choose one of: keep, 32, bf16, 16)",
        out,
        (src,),
    )


@pytest.mark.parametrize(
    "args, problem",
    [
        (["--target-tp", "0"], "argument --target-tp: expected a positive integer, got '0'"),
        (["--workers", "x"], "argument --workers: expected a positive integer, got 'x'"),
        (
            ["--layers-per-stage", "a,b"],
            "argument --layers-per-stage: expected comma-separated layer counts like 5,5,6, "
            "got 'a,b'",
        ),
    ],
)
def test_malformed_arguments_are_one_line_too(src, out, args, problem):
    rc, stdout, err = run_cli("reshard", src, out, *args)
    assert (rc, stdout) == (2, "")
    assert err == f"ckpt reshard: error: {problem} (see ckpt reshard --help)\n"
    assert not out.exists()


def test_unknown_option(src, out):
    rc, stdout, err = run_cli("reshard", src, out, "--frobnicate")
    assert (rc, stdout) == (2, "")
    assert err == "ckpt: error: unrecognized arguments: --frobnicate (see ckpt --help)\n"
    assert not out.exists()


def test_missing_arguments(out):
    rc, _, err = run_cli("reshard")
    assert rc == 2
    assert err == (
        "ckpt reshard: error: the following arguments are required: source, dest "
        "(see ckpt reshard --help)\n"
    )


def test_destination_is_the_source(src, out):
    assert_refused(
        ["reshard", src, src, "--target-tp", "2"],
        f"{src}: destination is the source; write to another path",
        sources=(src,),
    )


def test_destination_is_the_source_by_another_name(src, tmp_path):
    other = tmp_path / "sub" / ".." / "model.nemo"
    (tmp_path / "sub").mkdir()
    link = tmp_path / "link.nemo"
    os.symlink(src, link)
    for dest in (other, link):
        assert_refused(
            ["reshard", src, dest, "--target-tp", "2", "--overwrite"],
            f"{dest}: destination is the source; write to another path",
            sources=(src,),
        )


def test_destination_is_a_source_rank_file(templates, tmp_path):
    folder = copy(templates.train_tp1, tmp_path / "train")
    dest = folder / templates.train_name
    assert_refused(
        ["convert", dest, dest, "--overwrite"],
        f"{dest}: destination is the source; write to another path",
        sources=(folder,),
    )


def test_destination_is_a_file_inside_the_source_folder(templates, tmp_path):
    """Replacing one of the rank files being read would destroy the source."""
    folder = copy(templates.train_tp2, tmp_path / "train")
    dest = folder / "mp_rank_01" / templates.train_name
    assert_refused(
        ["convert", folder, dest, "--overwrite"],
        f"{dest}: destination is a file of the source; write to another path",
        sources=(folder,),
    )
    new = folder / "model.nemo"  # a new file beside the ranks is fine
    rc, _, err = run_cli("convert", folder, new)
    assert rc == 0, err


def test_destination_exists(src, out):
    out.write_bytes(b"keep me")
    assert_refused(
        ["reshard", src, out],
        f"{out}: destination already exists (pass --overwrite to replace it)",
        sources=(src, out),
    )
    rc, _, err = run_cli("reshard", src, out, "--overwrite")
    assert rc == 0, err
    assert tarfile.is_tarfile(out)  # replaced by the archive
    assert sorted(os.listdir(out.parent)) == ["model.nemo"]


def test_destination_is_a_folder(src, out):
    out.mkdir()
    assert_refused(
        ["reshard", src, out],
        f"{out}: destination already exists (pass --overwrite to replace it)",
        sources=(src, out),
    )
    assert_refused(
        ["reshard", src, out, "--overwrite"],
        f"{out}: destination is a directory",
        sources=(src, out),
    )


def test_source_not_found(tmp_path, out):
    missing = tmp_path / "nope.nemo"
    assert_refused(["reshard", missing, out], f"{missing}: not found", out)


def test_destination_folder_cannot_be_created(src, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_bytes(b"x")
    dest = blocker / "sub" / "model.nemo"
    assert_refused(
        ["reshard", src, dest],
        f"{dest}: cannot create the destination folder: Not a directory",
        sources=(src, blocker),
    )


def test_good_parameters_pass(src, out):
    """Control: a layout that fits."""
    rc, _, err = run_cli("reshard", src, out, "--target-tp", "2", "--target-pp", "2")
    assert rc == 0, err
    assert CFG["num_layers"] == 2
