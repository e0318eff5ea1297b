"""bench/gpu_check.sh --cpu: the GPU check's dry run passes on the CPU and reports every result.

The dry run goes through every step the GPU run takes (featurize twice and compare, the encoder
probe, interrupted-and-resumed decoder and joint runs against uninterrupted ones, evaluate,
caption, the speeds), at tiny sizes with random CNN weights, so it needs no network.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_every_result(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable, "TMPDIR": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh"), "--cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = tmp_path / "out" / "gpu_check.log"
    tail = log.read_text()[-3000:] if log.exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + tail
    r = json.loads((tmp_path / "out" / "gpu_check.json").read_text())

    assert r["ok"] is True and r["exit_code"] == 0 and r["mode"] == "cpu"
    assert r["failures"] == [] and r["skipped"] == []
    assert all(s["status"] == "ok" for s in r["steps"].values()), r["steps"]
    assert {
        "featurize_synth_accelerator",
        "featurize_synth_cpu",
        "probe_synth",
        "decoder_ref",
        "decoder_session3",
        "joint_ref",
        "joint_session2",
        "evaluate_decoder",
        "evaluate_joint",
        "caption",
    } <= set(r["steps"])

    # CPU against CPU: the two stores are the same bits, and the probe computes what featurize stored
    cli = r["features"]["synth"]["cli"]
    assert cli["bit_identical"] and cli["max_abs_diff"] == 0.0 and cli["within_tolerance"] and cli["boxes_equal"]
    assert cli["shape"][1:] == [2, 2048] and cli["dtype"] == "float16"
    fp32 = r["features"]["synth"]["probe"]["modes"]["fp32"]
    assert fp32["within_tolerance"] and fp32["rel_max_abs_diff"] <= 1e-3 and fp32["min_cosine"] >= 0.999

    # resumes are exact, and the sessions really stopped mid-run
    assert r["resume_exact"] is True
    for phase in ("decoder", "joint"):
        assert r["resume"][phase]["exact"] and r["resume"][phase]["repeat_exact"], r["resume"][phase]
    assert r["resume"]["decoder_stops"]["after_session2"]["batch_in_epoch"] > 0
    joint_stop = r["resume"]["joint_stops"]["after_session1"]
    assert joint_stop["phase"] == "joint" and joint_stop["epoch"] == 0 and joint_stop["batch_in_epoch"] > 0

    assert "CIDEr-D" in r["evaluate"]["decoder"]["scores_x100"] and r["evaluate"]["joint"]["phase"] == "joint"
    assert r["caption"]["synth"]["every_image"] and r["caption"]["synth"]["captioned"] == 24
    assert r["torchrun_nccl"]["ran"] is False

    speeds = r["speeds"]
    for key in (
        "featurize_crops_per_s_fp32",
        "featurize_cli_crops_per_s_cpu_run",
        "decoder_epoch_s",
        "joint_s_per_batch",
        "caption_photos_per_s_beam3",
    ):
        assert isinstance(speeds[key], float) and speeds[key] > 0, (key, speeds[key])
    if r["env"]["cpu_bf16"]:
        assert speeds["featurize_crops_per_s_bf16"] > 0
