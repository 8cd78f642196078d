"""Every option of every ``ckpt`` command does what its help says.

Each test runs a command with and without an option (or with two values of it) on tiny sample
inputs and checks that the outputs differ the way the option promises: rank folders for
``--target-tp``, dtypes for ``--precision``, the step for ``--checkpoint``, the exit status for
``--tolerance``, and so on. :data:`COVERED` lists the options these tests exercise;
``test_every_option_is_covered`` fails when a command gains an option that is not in it.

The commands run in this process through ``ckptcore.cli.main`` (as ``tests/hostile`` does), so
a call takes milliseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import tarfile
import threading
from pathlib import Path

import pytest
import torch
from cli_runner import run_cli
from helpers import local_s3, rank_state_dicts

from ckptcore import cli as cli_module
from ckptcore.sample import random_state_dict, vit_config, write_nemo, write_training_checkpoint

# 3 layers: an uneven pipeline split exists (2,1 or 1,2). One class token and the finetune
# head: export-hf accepts it, so the same model also gives the HF folder import-hf reads.
CFG = vit_config("tiny", layers=3, class_token_length=1, finetune=True)

# command -> the options the tests below show to have an effect (positionals excluded).
COVERED = {
    "inspect": {"--json", "--checkpoint"},
    "convert": {
        "--json",
        "--checkpoint",
        "--target-tp",
        "--target-pp",
        "--layers-per-stage",
        "--precision",
        "--overwrite",
        "--workers",
        "--read-concurrency",
        "--allow-nonfinite",
        "--progress",
    },
    "verify": {"--json", "--tolerance", "--images", "--run-both"},
    "plan": {
        "--json",
        "--checkpoint",
        "--estimate",
        "--source-tp",
        "--source-pp",
        "--gbps",
        "--workers-list",
        "--target-tp",
        "--target-pp",
        "--layers-per-stage",
        "--precision",
    },
    "import-hf": {
        "--json",
        "--source",
        "--layout",
        "--target-tp",
        "--target-pp",
        "--layers-per-stage",
        "--precision",
        "--overwrite",
    },
    "export-hf": {"--json", "--overwrite"},
}
COVERED["reshard"] = COVERED["convert"]
CONVERT_LIKE = ("convert", "reshard")


def ok(*args: object) -> str:
    """stdout of a command that must succeed."""
    rc, out, err = run_cli(*args)
    assert rc == 0, (args, err)
    return out


def ok_json(*args: object) -> dict:
    return json.loads(ok(*args, "--json"))


def refused(*args: object) -> str:
    """The one-line error of a command that must fail with exit status 2."""
    rc, out, err = run_cli(*args)
    assert rc == 2 and out == "", (args, rc, out, err)
    assert len(err.strip().splitlines()) == 1, err
    return err


def members(nemo: Path) -> set[str]:
    with tarfile.open(nemo) as tar:
        return {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}


def layers_per_rank(nemo: Path) -> dict[tuple[int, int], int]:
    """{(tp_rank, pp_rank): number of transformer layers in that rank file}."""
    out = {}
    for rank, sd in rank_state_dicts(str(nemo)).items():
        out[rank] = len({k.split(".layers.")[1].split(".")[0] for k in sd if ".layers." in k})
    return out


def dtypes(nemo: Path) -> set[torch.dtype]:
    return {
        t.dtype
        for sd in rank_state_dicts(str(nemo)).values()
        for t in sd.values()
        if t is not None and t.is_floating_point()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A TP=1 ``.nemo``; a TP=2 training folder with two checkpoints (step 100 ``-last``, step
    200 not last, different weights); a ``.nemo`` holding a NaN; an HF folder of the model."""
    from ckptcore.community import export_hf

    root = tmp_path_factory.mktemp("inputs")
    nemo = root / "a.nemo"
    write_nemo(str(nemo), CFG)
    train = root / "train"
    last, _ = write_training_checkpoint(str(train), CFG, tp=2, step=100, last=True, seed=0)
    later, _ = write_training_checkpoint(str(train), CFG, tp=2, step=200, last=False, seed=1)
    sd = random_state_dict(dict(CFG, tensor_model_parallel_size=1), seed=2)
    next(v for k, v in sd.items() if k.endswith("weight") and v is not None)[0].fill_(float("nan"))
    nan = root / "nan.nemo"
    write_nemo(str(nan), CFG, state_dict=sd)
    hf = root / "hf"
    export_hf(str(nemo), str(hf))
    return {"nemo": nemo, "train": train, "nan": nan, "hf": hf, "last": last, "later": later}


# --------------------------------------------------------------------------- every option


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {
        max(a.option_strings, key=len)
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction)
    }


def test_every_option_is_covered() -> None:
    """A new option fails this until a test below shows what it does."""
    parser = cli_module.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {name: _options(p) for name, p in sub.choices.items()}
    assert found == COVERED


# --------------------------------------------------------------------------- inspect


def test_inspect_json(inputs) -> None:
    text = ok("inspect", inputs["nemo"])
    assert text.startswith(f"{inputs['nemo']}\n") and "TP=1 PP=1" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
    info = ok_json("inspect", inputs["nemo"])
    assert (info["tp"], info["pp"], info["layers_per_stage"]) == (1, 1, [3])


def test_inspect_checkpoint(inputs) -> None:
    train = inputs["train"]
    assert ok_json("inspect", train)["step"] == 100  # default: last
    assert ok_json("inspect", train, "--checkpoint", "last")["step"] == 100
    assert ok_json("inspect", train, "--checkpoint", "latest")["step"] == 200
    picked = ok_json("inspect", train, "--checkpoint", inputs["later"])
    assert (picked["step"], picked["checkpoint"]) == (200, inputs["later"])
    assert "step        200" in ok("inspect", train, "--checkpoint", "latest")


# --------------------------------------------------------------------------- convert, reshard


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_json(command, inputs, tmp_path) -> None:
    text = ok(command, inputs["nemo"], tmp_path / "a.nemo")
    assert text.startswith(f"wrote {tmp_path / 'a.nemo'}: TP=1 PP=1 -> TP=1 PP=1")
    report = ok_json(command, inputs["nemo"], tmp_path / "b.nemo")
    assert report["destination"] == str(tmp_path / "b.nemo")
    assert report["output_bytes"] == (tmp_path / "b.nemo").stat().st_size


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_checkpoint(command, inputs, tmp_path) -> None:
    train = inputs["train"]
    assert ok_json(command, train, tmp_path / "a.nemo")["step"] == 100  # default: last
    assert ok_json(command, train, tmp_path / "b.nemo", "--checkpoint", "last")["step"] == 100
    assert ok_json(command, train, tmp_path / "c.nemo", "--checkpoint", "latest")["step"] == 200
    picked = ok_json(command, train, tmp_path / "d.nemo", "--checkpoint", inputs["later"])
    assert (picked["step"], picked["checkpoint_name"]) == (200, inputs["later"])
    a, c = rank_state_dicts(str(tmp_path / "a.nemo")), rank_state_dicts(str(tmp_path / "c.nemo"))
    key = "model.head.weight"
    assert not torch.equal(a[(0, 0)][key], c[(0, 0)][key])  # other weights, not only the step


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_target_tp_and_pp(command, inputs, tmp_path) -> None:
    src = inputs["train"]  # TP=2, PP=1
    ok(command, src, tmp_path / "keep.nemo")
    assert members(tmp_path / "keep.nemo") == {
        "model_config.yaml",
        "mp_rank_00/model_weights.ckpt",
        "mp_rank_01/model_weights.ckpt",
    }
    ok(command, src, tmp_path / "tp1.nemo", "--target-tp", "1")
    assert members(tmp_path / "tp1.nemo") == {"model_config.yaml", "model_weights.ckpt"}
    report = ok_json(command, src, tmp_path / "pp3.nemo", "--target-pp", "3")
    assert (report["target_tp"], report["target_pp"]) == (2, 3)
    assert set(layers_per_rank(tmp_path / "pp3.nemo")) == {
        (t, p) for t in (0, 1) for p in (0, 1, 2)
    }


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_layers_per_stage(command, inputs, tmp_path) -> None:
    src = inputs["nemo"]
    assert "give --layers-per-stage" in refused(
        command, src, tmp_path / "x.nemo", "--target-pp", "2"
    )
    ok(command, src, tmp_path / "a.nemo", "--target-pp", "2", "--layers-per-stage", "2,1")
    ok(command, src, tmp_path / "b.nemo", "--target-pp", "2", "--layers-per-stage", "1,2")
    assert layers_per_rank(tmp_path / "a.nemo") == {(0, 0): 2, (0, 1): 1}
    assert layers_per_rank(tmp_path / "b.nemo") == {(0, 0): 1, (0, 1): 2}
    # without --target-pp the split alone sets the number of stages
    ok(command, src, tmp_path / "c.nemo", "--layers-per-stage", "1,1,1")
    assert layers_per_rank(tmp_path / "c.nemo") == {(0, 0): 1, (0, 1): 1, (0, 2): 1}


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_precision(command, inputs, tmp_path) -> None:
    src = inputs["nemo"]
    assert ok_json(command, src, tmp_path / "keep.nemo")["precision"] == "32"
    assert dtypes(tmp_path / "keep.nemo") == {torch.float32}
    assert ok_json(command, src, tmp_path / "bf16.nemo", "--precision", "bf16")["precision"] == (
        "bf16"
    )
    assert dtypes(tmp_path / "bf16.nemo") == {torch.bfloat16}
    ok(command, src, tmp_path / "16.nemo", "--precision", "16")
    assert dtypes(tmp_path / "16.nemo") == {torch.float16}


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_overwrite(command, inputs, tmp_path) -> None:
    dest = tmp_path / "out.nemo"
    dest.write_bytes(b"keep me")
    assert "--overwrite" in refused(command, inputs["nemo"], dest)
    assert dest.read_bytes() == b"keep me"
    ok(command, inputs["nemo"], dest, "--overwrite")
    assert "model_weights.ckpt" in members(dest)


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_workers(command, inputs, tmp_path, monkeypatch) -> None:
    """``--workers N`` writes the rank files on N threads (staged, then packed); the archive
    is the same bytes as the one streamed by a single worker."""
    import ckptcore.engine

    threads: list[str] = []
    write_file = ckptcore.engine.write_file

    def spy(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return write_file(*args, **kwargs)

    monkeypatch.setattr(ckptcore.engine, "write_file", spy)
    src = inputs["nemo"]
    ok(command, src, tmp_path / "one.nemo", "--target-tp", "2", "--target-pp", "3")
    assert threads == []  # one worker: rank files stream straight into the archive
    ok(
        command,
        src,
        tmp_path / "many.nemo",
        "--target-tp",
        "2",
        "--target-pp",
        "3",
        "--workers",
        "3",
    )
    assert len(threads) == 6  # every rank file written to the staging folder...
    assert threading.main_thread().name not in threads  # ...by the worker threads
    assert (tmp_path / "one.nemo").read_bytes() == (tmp_path / "many.nemo").read_bytes()


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_read_concurrency(command, inputs, tmp_path, monkeypatch) -> None:
    """``--read-concurrency N``: N ranged GETs in flight per source object in S3, for this
    command only (the environment variable it sets is restored)."""
    import ckptcore.storage

    monkeypatch.delenv("CKPT_READ_CONCURRENCY", raising=False)
    pools: list[int] = []
    executor = ckptcore.storage.ThreadPoolExecutor

    def spy(max_workers=None, *args, **kwargs):
        if kwargs.get("thread_name_prefix") == "ckpt-get":
            pools.append(max_workers)
        return executor(max_workers, *args, **kwargs)

    monkeypatch.setattr(ckptcore.storage, "ThreadPoolExecutor", spy)
    bucket = f"read-concurrency-{command}"  # moto keeps buckets between servers
    with local_s3(bucket) as fs:
        fs.put(str(inputs["nemo"]), f"{bucket}/a.nemo")
        src = f"s3://{bucket}/a.nemo"
        ok(command, src, tmp_path / "default.nemo")
        default = set(pools)
        pools.clear()
        ok(command, src, tmp_path / "two.nemo", "--read-concurrency", "2")
    assert default == {4} and set(pools) == {2}
    assert "CKPT_READ_CONCURRENCY" not in os.environ
    assert (tmp_path / "default.nemo").read_bytes() == (tmp_path / "two.nemo").read_bytes()
    assert "1..64" in refused(
        command, inputs["nemo"], tmp_path / "x.nemo", "--read-concurrency", "65"
    )


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_allow_nonfinite(command, inputs, tmp_path) -> None:
    err = refused(command, inputs["nan"], tmp_path / "refused.nemo")
    assert "NaN" in err or "non-finite" in err, err
    assert not (tmp_path / "refused.nemo").exists()
    ok(command, inputs["nan"], tmp_path / "kept.nemo", "--allow-nonfinite")
    assert any(
        t is not None and t.is_floating_point() and t.isnan().any()
        for sd in rank_state_dicts(str(tmp_path / "kept.nemo")).values()
        for t in sd.values()
    )


@pytest.mark.parametrize("command", CONVERT_LIKE)
def test_convert_progress(command, inputs, tmp_path) -> None:
    """A progress bar on stderr: ``always`` draws it, ``never`` and ``auto`` (stderr is not a
    terminal here) do not."""
    src = inputs["nemo"]
    for i, mode in enumerate(("never", "auto", None)):
        extra = () if mode is None else ("--progress", mode)
        rc, _, err = run_cli(command, src, tmp_path / f"{i}.nemo", *extra)
        assert rc == 0 and err == "", (mode, err)
    rc, _, err = run_cli(command, src, tmp_path / "always.nemo", "--progress", "always")
    assert rc == 0 and "writing:" in err and "B/s" in err, err


# --------------------------------------------------------------------------- verify


@pytest.fixture(scope="module")
def verify_inputs(inputs, tmp_path_factory) -> dict[str, Path]:
    """The source, a bit-identical TP=2 copy and a bf16 copy (logits differ by ~1e-3)."""
    root = tmp_path_factory.mktemp("verify")
    ok("reshard", inputs["nemo"], root / "tp2.nemo", "--target-tp", "2")
    ok("reshard", inputs["nemo"], root / "bf16.nemo", "--precision", "bf16")
    return {"a": inputs["nemo"], "tp2": root / "tp2.nemo", "bf16": root / "bf16.nemo"}


def test_verify_json(verify_inputs) -> None:
    rc, text, _ = run_cli("verify", verify_inputs["a"], verify_inputs["tp2"])
    assert rc == 0 and text.startswith("OK: max |logit difference|")
    report = ok_json("verify", verify_inputs["a"], verify_inputs["tp2"])
    assert report["passed"] is True and report["b"] == str(verify_inputs["tp2"])


def test_verify_tolerance(verify_inputs) -> None:
    a, b = verify_inputs["a"], verify_inputs["bf16"]
    rc, out, _ = run_cli("verify", a, b, "--json")  # default 1e-5
    report = json.loads(out)
    assert rc == 1 and not report["passed"] and report["tolerance"] == 1e-5
    assert 1e-5 < report["max_abs_diff"] < 1.0
    rc, out, _ = run_cli("verify", a, b, "--json", "--tolerance", "1.0")
    assert rc == 0 and json.loads(out)["passed"] and json.loads(out)["tolerance"] == 1.0


def test_verify_images(verify_inputs) -> None:
    a, b = verify_inputs["a"], verify_inputs["tp2"]
    assert ok_json("verify", a, b)["images"] == 4
    assert ok_json("verify", a, b, "--images", "2")["images"] == 2
    assert ", 3 images;" in ok("verify", a, b, "--images", "3")


def test_verify_run_both(verify_inputs) -> None:
    a, b = verify_inputs["a"], verify_inputs["tp2"]
    assert ok_json("verify", a, b)["method"] == "same-weights"
    report = ok_json("verify", a, b, "--run-both")
    assert report["method"] == "logits" and report["passed"]


# --------------------------------------------------------------------------- plan


def test_plan_json(inputs) -> None:
    text = ok("plan", inputs["nemo"])
    assert "1 work items" in text and "total: reads" in text
    out = ok_json("plan", inputs["nemo"])
    assert set(out) == {"plan", "items", "estimates"} and len(out["items"]) == 1
    assert out["items"][0]["reads"]  # --json lists the byte ranges each item reads


def test_plan_checkpoint(inputs) -> None:
    train = inputs["train"]

    def files_read(*extra: str) -> set[str]:
        items = ok_json("plan", train, *extra)["items"]
        return {os.path.basename(name) for item in items for name, _, _ in item["reads"]}

    assert files_read() == {inputs["last"]}
    assert files_read("--checkpoint", "last") == {inputs["last"]}
    assert files_read("--checkpoint", "latest") == {inputs["later"]}
    assert files_read("--checkpoint", inputs["later"]) == {inputs["later"]}


def test_plan_target_tp_pp_and_layers(inputs) -> None:
    src = inputs["nemo"]
    assert ok_json("plan", src)["plan"]["target"] == {"tp": 1, "pp": 1, "layers_per_stage": [3]}
    out = ok_json("plan", src, "--target-tp", "2")
    assert out["plan"]["target"]["tp"] == 2 and len(out["items"]) == 2
    out = ok_json("plan", src, "--target-pp", "3")
    assert out["plan"]["target"] == {"tp": 1, "pp": 3, "layers_per_stage": [1, 1, 1]}
    out = ok_json("plan", src, "--target-pp", "2", "--layers-per-stage", "1,2")
    assert out["plan"]["target"]["layers_per_stage"] == [1, 2]
    assert [i["pp_rank"] for i in out["items"]] == [0, 1]
    assert out["items"][0]["write_bytes"] < out["items"][1]["write_bytes"]


def test_plan_precision(inputs) -> None:
    keep = ok_json("plan", inputs["nemo"])
    bf16 = ok_json("plan", inputs["nemo"], "--precision", "bf16")
    assert keep["plan"]["config"]["precision"] == 32
    assert bf16["plan"]["config"]["precision"] == "bf16"
    assert bf16["items"][0]["write_bytes"] < 0.6 * keep["items"][0]["write_bytes"]


def test_plan_estimate_and_its_options(inputs) -> None:
    assert "not found" in refused("plan", "tiny")  # without --estimate: a path
    out = ok_json("plan", "tiny", "--estimate")
    assert out["plan"]["source_tp"] == 1 and out["plan"]["source_pp"] == 1
    assert [e["workers"] for e in out["estimates"]] == [1, 4, 16, 64]
    assert out["items"][0]["reads"] == []  # shapes only: no byte ranges
    out = ok_json("plan", "tiny", "--estimate", "--source-tp", "2", "--source-pp", "2")
    assert (out["plan"]["source_tp"], out["plan"]["source_pp"]) == (2, 2)
    base = ok_json("plan", "tiny", "--estimate", "--workers-list", "1,2")["estimates"]
    assert [e["workers"] for e in base] == [1, 2]
    fast = ok_json("plan", "tiny", "--estimate", "--workers-list", "1,2", "--gbps", "4")
    assert [e["seconds"] for e in fast["estimates"]] == pytest.approx(
        [e["seconds"] / 4 for e in base]
    )
    text = ok("plan", "tiny", "--estimate", "--gbps", "4", "--workers-list", "8")
    assert "each worker and the flow moving 4 GB/s" in text and "8 workers: items" in text
    # end to end: in place adds only what the flow writes (the tail); staged adds the package
    # and the upload of every output byte through the flow's process
    e, written = fast["estimates"][0], sum(i["write_bytes"] for i in fast["items"])
    assert e["flow_bytes"] > written  # a model too small for an S3 part: the flow writes it
    big = ok_json("plan", "vit-70b", "--estimate", "--source-tp", "8", "--target-tp", "4")
    assert 0 < big["estimates"][0]["flow_bytes"] < 64 << 10  # the tail alone
    assert e["in_place_seconds"] == pytest.approx(e["seconds"] + e["flow_bytes"] / 4e9)
    assert e["staged_seconds"] == pytest.approx(e["seconds"] + 2 * written / 4e9)


def test_plan_refuses_options_of_the_other_mode(inputs) -> None:
    """Options that only one mode uses are refused in the other instead of being ignored."""
    for extra in (("--source-tp", "2"), ("--source-pp", "2"), ("--gbps", "2")):
        assert "used only with --estimate" in refused("plan", inputs["nemo"], *extra)
    assert "--workers-list" in refused("plan", inputs["nemo"], "--workers-list", "2")
    assert "not used with --estimate" in refused(
        "plan", "tiny", "--estimate", "--checkpoint", "latest"
    )
    for bad in (("--gbps", "0"), ("--workers-list", "1,0")):
        assert "expected" in refused("plan", "tiny", "--estimate", *bad)


# --------------------------------------------------------------------------- import-hf


def test_import_hf_json(inputs, tmp_path) -> None:
    text = ok("import-hf", inputs["hf"], tmp_path / "a.nemo")
    assert text == f"wrote {tmp_path / 'a.nemo'}: TP=1 PP=1\n"
    report = ok_json("import-hf", inputs["hf"], tmp_path / "b.nemo")
    assert report["source_kind"] == "hf" and report["destination"] == str(tmp_path / "b.nemo")


def test_import_hf_source_kind(inputs, tmp_path) -> None:
    hf = inputs["hf"]
    assert ok_json("import-hf", hf, tmp_path / "a.nemo")["source_kind"] == "hf"  # detected
    report = ok_json("import-hf", hf, tmp_path / "b.nemo", "--source", "transformers")
    assert report["source_kind"] == "hf"
    # read as timm, the transformers config.json has no timm architecture
    assert "architecture" in refused("import-hf", hf, tmp_path / "c.nemo", "--source", "timm")


def test_import_hf_layout(inputs, tmp_path) -> None:
    ok("import-hf", inputs["hf"], tmp_path / "conv1.nemo")
    ok("import-hf", inputs["hf"], tmp_path / "linear.nemo", "--layout", "linear_encoder")
    conv1 = rank_state_dicts(str(tmp_path / "conv1.nemo"))[(0, 0)]
    linear = rank_state_dicts(str(tmp_path / "linear.nemo"))[(0, 0)]
    assert "model.backbone.conv1.weight" in conv1
    assert "model.backbone.linear_encoder.weight" not in conv1
    assert "model.backbone.linear_encoder.weight" in linear
    assert "model.backbone.conv1.weight" not in linear


def test_import_hf_target_tp_and_pp(inputs, tmp_path) -> None:
    ok("import-hf", inputs["hf"], tmp_path / "tp2.nemo", "--target-tp", "2")
    assert members(tmp_path / "tp2.nemo") == {
        "model_config.yaml",
        "mp_rank_00/model_weights.ckpt",
        "mp_rank_01/model_weights.ckpt",
    }
    ok("import-hf", inputs["hf"], tmp_path / "pp3.nemo", "--target-pp", "3")
    assert layers_per_rank(tmp_path / "pp3.nemo") == {(0, 0): 1, (0, 1): 1, (0, 2): 1}


def test_import_hf_layers_per_stage(inputs, tmp_path) -> None:
    """The split asked for, not "give --layers-per-stage" (the option used to be dropped)."""
    hf = inputs["hf"]
    assert "give --layers-per-stage" in refused(
        "import-hf", hf, tmp_path / "x.nemo", "--target-pp", "2"
    )
    ok("import-hf", hf, tmp_path / "a.nemo", "--target-pp", "2", "--layers-per-stage", "2,1")
    ok("import-hf", hf, tmp_path / "b.nemo", "--target-pp", "2", "--layers-per-stage", "1,2")
    assert layers_per_rank(tmp_path / "a.nemo") == {(0, 0): 2, (0, 1): 1}
    assert layers_per_rank(tmp_path / "b.nemo") == {(0, 0): 1, (0, 1): 2}
    assert members(tmp_path / "a.nemo") == {
        "model_config.yaml",
        "tp_rank_00_pp_rank_000/model_weights.ckpt",
        "tp_rank_00_pp_rank_001/model_weights.ckpt",
    }
    assert "has 3 stages" in refused(
        "import-hf", hf, tmp_path / "y.nemo", "--target-pp", "2", "--layers-per-stage", "1,1,1"
    )


def test_import_hf_precision(inputs, tmp_path) -> None:
    ok("import-hf", inputs["hf"], tmp_path / "keep.nemo")
    assert dtypes(tmp_path / "keep.nemo") == {torch.float32}
    report = ok_json("import-hf", inputs["hf"], tmp_path / "bf16.nemo", "--precision", "bf16")
    assert report["precision"] == "bf16" and dtypes(tmp_path / "bf16.nemo") == {torch.bfloat16}


def test_import_hf_overwrite(inputs, tmp_path) -> None:
    dest = tmp_path / "out.nemo"
    dest.write_bytes(b"keep me")
    assert "already exists" in refused("import-hf", inputs["hf"], dest)
    assert dest.read_bytes() == b"keep me"
    ok("import-hf", inputs["hf"], dest, "--overwrite")
    assert "model_weights.ckpt" in members(dest)


# --------------------------------------------------------------------------- export-hf


def test_export_hf_json(inputs, tmp_path) -> None:
    assert ok("export-hf", inputs["nemo"], tmp_path / "a") == f"wrote {tmp_path / 'a'}\n"
    info = ok_json("export-hf", inputs["nemo"], tmp_path / "b")
    assert info["destination"] == str(tmp_path / "b") and info["layout"] == "conv1"
    assert sorted(os.listdir(tmp_path / "b")) == ["config.json", "model.safetensors"]


def test_export_hf_overwrite(inputs, tmp_path) -> None:
    dest = tmp_path / "hf"
    dest.mkdir()
    (dest / "old.txt").write_text("keep me")
    assert "already exists" in refused("export-hf", inputs["nemo"], dest)
    assert os.listdir(dest) == ["old.txt"]
    ok("export-hf", inputs["nemo"], dest, "--overwrite")
    assert sorted(os.listdir(dest)) == ["config.json", "model.safetensors"]
