"""Benchmark: streaming reshard vs the copy floor (cp) vs the naive load-all approach.

Makes ViT-Large-width checkpoints with ckptcore's generator (hidden 1024, ffn 4096, 16 heads;
the layer count sets the size: 24 layers = 1.2 GB fp32), then times, each in a fresh process
with memory sampled every 5 ms (bench/memwatch.py):

- ``cp``: copying the source .nemo to the destination and syncing it (read once, write once);
- ``ckpt``: ``ckpt reshard`` (mmapped reads, one tensor at a time, fsynced output);
- ``ckpt-zlib``: the same with zlib's CRC-32 instead of the ``isal`` package's (``--skip-zlib``
  leaves it out);
- ``naive``: extract, ``torch.load`` every shard, ``torch.cat``, ``torch.save``, tar (NeMo's way).

Usage: ``python bench/reshard_bench.py [--sizes 0.3,1.2,3] [--repeat 3] [--cold] [--workers 1]``.
Results: a markdown table on stdout and ``bench/out/reshard.json``.

The Python tools run with bytecode caching on (``PYTHONPYCACHEPREFIX=bench/out/pycache``, written
by the untimed warm-up run), as an installed package would: a development shell that sets
``PYTHONDONTWRITEBYTECODE`` would otherwise charge every run for compiling ckptcore's modules
(~40-60 ms). ``--no-bytecode-cache`` keeps the environment as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from memwatch import run  # noqa: E402

LAYER_BYTES = 1024 * 1024 * 4 * 12  # ~one ViT-L layer in fp32 (12 H^2 params)


def make_sources(out: str, gb: float) -> dict[str, str]:
    import torch

    from ckptcore.sample import random_state_dict, vit_config, write_nemo

    layers = max(2, round(gb * 1e9 / LAYER_BYTES / 2) * 2)
    cfg = vit_config("large", layers=layers)
    paths = {
        "tp4": os.path.join(out, f"src_{gb}gb_tp4.nemo"),
        "tp2pp2": os.path.join(out, f"src_{gb}gb_tp2pp2.nemo"),
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    torch.manual_seed(0)
    sd = random_state_dict(cfg, seed=0)
    write_nemo(paths["tp4"], cfg, tp=4, state_dict=sd)
    write_nemo(paths["tp2pp2"], cfg, tp=2, pp=2, state_dict=sd)
    del sd
    return paths


def drop_caches() -> None:
    subprocess.run(["sync"], check=False)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


ZLIB_CKPT = (
    "import sys; from ckptcore.formats import zipwriter; zipwriter.use_fast_crc(False);"
    "from ckptcore.cli import main; sys.exit(main(sys.argv[1:]))"
)


def commands(src: str, dest: str, tp: int, pp: int, workers: int) -> dict[str, list[str]]:
    py = sys.executable
    args = [
        "reshard",
        src,
        dest,
        "--target-tp",
        str(tp),
        "--target-pp",
        str(pp),
        "--overwrite",
        "--progress",
        "never",
        "--workers",
        str(workers),
    ]
    return {
        "cp": ["sh", "-c", f"cp '{src}' '{dest}' && sync '{dest}'"],
        "ckpt": [py, "-m", "ckptcore.cli", *args],
        "ckpt-zlib": [py, "-c", ZLIB_CKPT, *args],
        "naive": [py, os.path.join(HERE, "naive_reshard.py"), src, dest, str(tp)],
    }  # fmt: skip


def measure(
    cmd: list[str], dest: str, cold: bool, repeat: int, env: dict[str, str] | None = None
) -> dict:
    results = []
    run(cmd, env)  # warm the page cache (and write the bytecode cache)
    for _ in range(repeat):
        if os.path.exists(dest):
            os.remove(dest)
        if cold:
            drop_caches()
        r = run(cmd, env)
        if r["returncode"] != 0:
            raise SystemExit(f"command failed: {' '.join(cmd)}")
        results.append(r)
    return {
        "seconds": statistics.median(r["seconds"] for r in results),
        "seconds_min": min(r["seconds"] for r in results),
        "seconds_max": max(r["seconds"] for r in results),
        "peak_anon": max(r["peak_anon"] for r in results),
        "peak_file": max(r["peak_file"] for r in results),
        "peak_rss": max(r["peak_rss"] for r in results),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes", default="1.2", help="comma-separated model sizes in GB (fp32 weights)"
    )
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--cold", action="store_true", help="drop the page cache before each run (root)"
    )
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--cases", default="tp4-tp2,tp4-tp1,tp2pp2-tp1")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--skip-zlib", action="store_true", help="leave out the zlib-CRC variant")
    ap.add_argument(
        "--no-bytecode-cache",
        action="store_true",
        help="run the Python tools in this environment as is (PYTHONDONTWRITEBYTECODE kept)",
    )
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    cases = {"tp4-tp2": ("tp4", 2, 1), "tp4-tp1": ("tp4", 1, 1), "tp2pp2-tp1": ("tp2pp2", 1, 1)}
    env = None
    if not args.no_bytecode_cache:
        env = dict(os.environ, PYTHONPYCACHEPREFIX=os.path.join(args.out, "pycache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
    rows = []
    for gb in [float(s) for s in args.sizes.split(",")]:
        t0 = time.perf_counter()
        srcs = make_sources(args.out, gb)
        print(f"# sources for {gb} GB ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        for case in args.cases.split(","):
            src_name, tp, pp = cases[case]
            src = srcs[src_name]
            nbytes = os.path.getsize(src)
            dest = os.path.join(args.out, f"out_{case}.nemo")
            row = {"gb": gb, "case": case, "bytes": nbytes}
            for name, cmd in commands(src, dest, tp, pp, args.workers).items():
                if (name == "naive" and args.skip_naive) or (
                    name == "ckpt-zlib" and args.skip_zlib
                ):
                    continue
                res = measure(cmd, dest, args.cold, args.repeat, None if name == "cp" else env)
                res["gbps"] = nbytes / res["seconds"] / 1e9
                row[name] = res
                print(
                    f"# {gb} GB {case} {name}: {res['seconds']:.2f} s, anon {res['peak_anon'] / 1e6:.0f} MB",
                    file=sys.stderr,
                )
            if os.path.exists(dest):
                os.remove(dest)
            rows.append(row)
    with open(os.path.join(args.out, "reshard.json"), "w") as f:
        json.dump(
            {
                "cold": args.cold,
                "workers": args.workers,
                "bytecode_cache": not args.no_bytecode_cache,
                "rows": rows,
            },
            f,
            indent=2,
        )
    print(table(rows, args.cold))


def table(rows: list[dict], cold: bool) -> str:
    lines = [
        f"| size | case | tool | wall s (min-max) | GB/s | peak anon MB | peak file MB | vs cp | vs naive |  ({'cold' if cold else 'warm'} cache)",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for tool in ("cp", "ckpt", "ckpt-zlib", "naive"):
            if tool not in row:
                continue
            r = row[tool]
            vs_cp = r["seconds"] / row["cp"]["seconds"]
            vs_naive = (
                f"{row['naive']['seconds'] / r['seconds']:.1f}x faster"
                if "naive" in row and tool.startswith("ckpt")
                else ""
            )
            lines.append(
                f"| {row['bytes'] / 1e9:.2f} GB | {row['case']} | {tool} | {r['seconds']:.2f} ({r['seconds_min']:.2f}-{r['seconds_max']:.2f}) | "
                f"{r['gbps']:.2f} | {r['peak_anon'] / 1e6:.0f} | {r['peak_file'] / 1e6:.0f} | {vs_cp:.2f}x | {vs_naive} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
