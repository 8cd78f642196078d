"""Helpers shared by the flow tests (imported by name: this folder is on ``sys.path``)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

BUCKETS = ("ckpt-training", "ckpt-models", "ckpt-scratch")


def clear_s3_cache() -> None:
    """Forget cached s3fs clients (they keep the endpoint they were made with)."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()


@dataclass
class Sample:
    """A sample training checkpoint: where it is and the TP=1 weights it was made from."""

    local: str
    url: str
    name: str
    state_dict: dict
    config: dict


def make_sample(
    tmp_path,
    s3fs_or_none,
    url: str | None,
    *,
    tp: int = 2,
    pp: int = 1,
    step: int = 100,
    last: bool = True,
    seed: int = 0,
    size: str = "tiny",
    local: str | None = None,
    unfinished: bool = False,
    **config_overrides,
) -> Sample:
    """Write a realistic NeMo ViT training checkpoint (with optimizer state) and upload it.

    ``local`` reuses a training folder (several checkpoints side by side); ``url`` is where the
    folder is uploaded (``None``: stay local).
    """
    from ckptcore.sample import vit_config, write_training_checkpoint

    local = local or str(tmp_path / f"train-{uuid.uuid4().hex[:6]}" / "checkpoints")
    cfg = vit_config(size, **config_overrides)
    name, sd = write_training_checkpoint(
        local, cfg, tp=tp, pp=pp, step=step, last=last, seed=seed, unfinished=unfinished
    )
    if url is None:
        return Sample(local, local, name, sd, cfg)
    s3fs_or_none.put(local + "/", url.removeprefix("s3://") + "/", recursive=True)
    return Sample(local, url, name, sd, cfg)
