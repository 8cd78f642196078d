"""The convert flow verifies in the verify process it starts with the run (``warm``) or in its
own process (``inline``, and ``auto`` where torch is imported already); a run leaves its verify
process idle for the next run in the same process."""

from __future__ import annotations

import pytest

import ckptcore.api
import ckptcore.verify_process
import tasks.convert
from flows.convert import convert_vit


@pytest.mark.usefixtures("prefect_api")
@pytest.mark.parametrize("mode", ["warm", "inline", "auto"])
def test_verify_runs_in_the_verify_process_which_the_next_run_reuses(
    s3, work_dir, prefix, sample_factory, monkeypatch, mode
):
    src = f"s3://ckpt-training/{prefix}/checkpoints"
    dest = f"s3://ckpt-models/{prefix}/vit.nemo"
    sample_factory(s3, src, tp=2)
    started: list[ckptcore.verify_process.VerifyProcess] = []
    real_init = ckptcore.verify_process.VerifyProcess.__init__

    warmed: list[list[str]] = []

    def recording_init(self, warm=()) -> None:
        real_init(self, warm)
        started.append(self)
        warmed.append(list(warm))

    monkeypatch.setattr(ckptcore.verify_process.VerifyProcess, "__init__", recording_init)

    def not_here(*args, **kwargs):
        raise AssertionError("verify ran in the flow's process")

    if mode == "warm":  # the verify process is another interpreter: this patch is not there
        monkeypatch.setattr(ckptcore.api, "verify", not_here)
    try:
        for run in range(2):
            dest = f"s3://ckpt-models/{prefix}/vit-{run}.nemo"
            state = convert_vit(
                source=src, destination=dest, target_tp=1, verify_process=mode, return_state=True
            )
            assert state.is_completed(), state.message
            assert state.result()["verify-passed"] == "true"
            assert s3.exists(dest)
            assert tasks.convert._VERIFIERS == {}  # none in use once a run is over
        # auto: torch is imported in this process (the tests import it), so verify runs here;
        # warm: the second run verified in the process the first one left idle
        assert len(started) == (1 if mode == "warm" else 0)
        # started with the first run's source and destination, whose stores it asks while idle
        assert warmed == ([[src, f"s3://ckpt-models/{prefix}/vit-0.nemo"]] if started else [])
        assert tasks.convert._IDLE == started
    finally:
        tasks.convert.close_idle_verifiers()
    assert all(p._proc.wait(60) == 0 for p in started)  # ended (stdin closed), not killed
