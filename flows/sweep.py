"""``sweep``: convert every finished training checkpoint that has no lineage record yet
(deployment ``sweep/vit``, on a cron schedule). Idempotent: a converted checkpoint has a
sidecar and is skipped next time; an unfinished one (``-unfinished`` marker) waits."""

from __future__ import annotations

from prefect import flow
from prefect.logging import get_run_logger

from flows.convert import convert_vit
from tasks.sweep import find_unconverted


@flow(name="sweep")
def sweep_vit(
    training_prefix: str,
    destination_prefix: str | None = None,
    target_tp: int | None = 1,
    target_pp: int | None = 1,
    precision: str = "keep",
    verify: bool = True,
    tolerance: float = 1e-5,
) -> dict[str, str]:
    """Convert what is new under ``training_prefix``; returns {destination: final state}.

    Args:
        training_prefix: where training jobs write (``s3://bucket/runs/``); every folder under
            it with ``.ckpt`` files is a training checkpoint folder.
        destination_prefix: where the ``.nemo`` files go, mirroring the folders under the
            prefix; default: ``<folder>/nemo/<stem>.nemo`` beside each checkpoint.
        target_tp: tensor-parallel size of the outputs.
        target_pp: pipeline-parallel size of the outputs.
        precision: ``keep``, or a target precision.
        verify: compare logits of every conversion.
        tolerance: the largest logit difference verify accepts (raise it with ``precision``:
            bf16 outputs differ from fp32 sources by about 1e-2).
    """
    pending = find_unconverted(training_prefix, destination_prefix)
    get_run_logger().info("%d checkpoint(s) to convert", len(pending))
    states = {}
    for item in pending:
        state = convert_vit(
            source=item.checkpoint_url,
            destination=item.destination,
            target_tp=target_tp,
            target_pp=target_pp,
            precision=precision,
            verify=verify,
            tolerance=tolerance,
            overwrite=True,  # no sidecar: whatever is there is an uncommitted leftover
            return_state=True,
        )
        states[item.destination] = state.name
    failed = sorted(dest for dest, name in states.items() if name != "Completed")
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(states)} conversions failed: {', '.join(failed)}"
        )
    return states
