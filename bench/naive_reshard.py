"""The naive approach NeMo's tools take, for comparison: extract, load every shard, cat, save.

``python bench/naive_reshard.py SRC.nemo DEST.nemo TARGET_TP`` (PP must be 1 at the target).
Everything is held in memory at once, as in ``megatron_change_num_partitions.py``.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
import tempfile

import torch
import yaml

COLUMN = re.compile(r"(query_key_value|dense_h_to_4h)\.(weight|bias)$")
ROW = re.compile(r"(self_attention\.dense|dense_4h_to_h)\.weight$")
LAYER = re.compile(r"^(model\.backbone\.transformer\.layers\.)(\d+)(\..*)$")


def main(src: str, dest: str, target_tp: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(src) as tar:
            tar.extractall(tmp, filter="data")
        cfg = yaml.safe_load(open(os.path.join(tmp, "model_config.yaml")))
        tp, pp = cfg["tensor_model_parallel_size"], cfg["pipeline_model_parallel_size"]

        def path(t: int, p: int) -> str:
            if tp == 1 and pp == 1:
                return os.path.join(tmp, "model_weights.ckpt")
            folder = f"mp_rank_{t:02d}" if pp == 1 else f"tp_rank_{t:02d}_pp_rank_{p:03d}"
            return os.path.join(tmp, folder, "model_weights.ckpt")

        shards = {
            (t, p): torch.load(path(t, p), map_location="cpu", weights_only=True)
            for p in range(pp)
            for t in range(tp)
        }
        merged: dict = {}
        offset = 0
        for p in range(pp):
            layers = 0
            for key in shards[(0, p)]:
                m = LAYER.match(key)
                gkey = key
                if m:
                    layers = max(layers, int(m.group(2)) + 1)
                    gkey = f"{m.group(1)}{offset + int(m.group(2))}{m.group(3)}"
                vals = [shards[(t, p)][key] for t in range(tp)]
                if vals[0] is None:
                    merged[gkey] = None
                elif COLUMN.search(key):
                    merged[gkey] = torch.cat(vals, 0)
                elif ROW.search(key):
                    merged[gkey] = torch.cat(vals, 1)
                else:
                    merged[gkey] = vals[0]
            offset += layers
        out_dir = os.path.join(tmp, "out")
        os.makedirs(out_dir)
        cfg["tensor_model_parallel_size"], cfg["pipeline_model_parallel_size"] = target_tp, 1
        with open(os.path.join(out_dir, "model_config.yaml"), "w") as f:
            yaml.safe_dump(cfg, f)
        for t in range(target_tp):
            sd = {}
            for key, v in merged.items():
                if v is None:
                    sd[key] = None
                elif COLUMN.search(key):
                    sd[key] = v.chunk(target_tp, 0)[t].clone()
                elif ROW.search(key):
                    sd[key] = v.chunk(target_tp, 1)[t].clone()
                else:
                    sd[key] = v.clone()
            if target_tp == 1:
                torch.save(sd, os.path.join(out_dir, "model_weights.ckpt"))
            else:
                os.makedirs(os.path.join(out_dir, f"mp_rank_{t:02d}"))
                torch.save(sd, os.path.join(out_dir, f"mp_rank_{t:02d}", "model_weights.ckpt"))
        with tarfile.open(dest, "w:") as tar:
            tar.add(out_dir, arcname=".")
        with open(dest, "rb+") as f:
            os.fsync(f.fileno())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
