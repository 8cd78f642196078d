"""``reshard``: a ``.nemo`` -> a ``.nemo`` at another TP/PP (deployment ``reshard/vit``).

The same steps as ``convert``; only the source differs (a ``.nemo`` file or extracted folder).
"""

from __future__ import annotations

from prefect import flow

from flows.convert import Repartition, SourceRead, Upload, VerifyProcess, convert_pipeline
from flows.routes import ConvertJob


@flow(name="reshard")
def reshard_vit(
    source: str,
    destination: str,
    target_tp: int | None = None,
    target_pp: int | None = None,
    precision: str = "keep",
    verify: bool = True,
    overwrite: bool = False,
    tolerance: float = 1e-5,
    scratch_url: str | None = None,
    runner: str | None = None,
    repartition: Repartition = "auto",
    upload: Upload = "stream",
    source_read: SourceRead = "in-place",
    verify_process: VerifyProcess = "auto",
) -> dict[str, str]:
    """Repartition a ``.nemo`` to the target TP/PP, verify it, upload it with lineage.

    Args:
        source: URL of a ``.nemo`` (or an extracted ``.nemo`` folder).
        destination: URL of the new ``.nemo``.
        target_tp: tensor-parallel size of the output (default: the source's).
        target_pp: pipeline-parallel size of the output (default: the source's).
        precision: ``keep``, or ``fp32``/``bf16``/``fp16``.
        verify: compare source and output logits (max diff <= ``tolerance``).
        overwrite: replace an existing destination.
        tolerance: the verify bound.
        scratch_url: scratch prefix for the repartition deployment (default
            ``CKPT_SCRATCH_URL``).
        runner, repartition, upload, source_read, verify_process: how the ``.nemo`` is
            built and checked, as for ``convert``.
    """
    job = ConvertJob(
        source, destination, "last", target_tp, target_pp, precision, verify, overwrite,
        tolerance, scratch_url, runner, repartition, upload, source_read, verify_process,
        kinds=("nemo", "nemo-dir"),
    )  # fmt: skip
    return convert_pipeline(job)
