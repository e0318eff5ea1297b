"""bench/gpu_check.sh --cpu: the GPU check's dry run passes on the CPU and reports every result.

The dry run goes through every step the GPU run takes (featurize twice and compare, the encoder
probe, interrupted-and-resumed decoder and joint runs against uninterrupted ones, evaluate,
caption, the speeds), at tiny sizes with random CNN weights, so it needs no network. The fast
tests check how bench/gpu_check.py turns results into failures and an exit code, and its arguments.
"""

import json
import os
import subprocess
import sys

import pytest

from bench.gpu_check import assemble
from tests.helpers import ROOT


def passing_results() -> dict:
    """What a run where everything passed collects (a subset: the keys assemble reads)."""
    step = {"status": "ok", "rc": 0, "seconds": 1.5, "limit_s": 300, "gpu_used": None}
    exact = {"exact": True, "repeat_exact": True, "explanation": "resumed run equals the uninterrupted one"}
    return {
        "mode": "cpu",
        "steps": {"decoder_ref": dict(step), "joint_ref": dict(step), "caption": dict(step)},
        "features": {"synth": {"cli": {"within_tolerance": True, "boxes_equal": True}}},
        "resume": {"decoder": dict(exact), "joint": dict(exact)},
        "runs": {"decoder": {"mean_epoch_s": 0.25}},
        "caption": {"synth": {"every_image": True, "errors": 0}},
    }


def test_the_results_give_the_exit_code_and_say_what_failed():
    res, lines = assemble(passing_results())
    assert (res["ok"], res["exit_code"], res["failures"], res["resume_exact"]) == (True, 0, [], True)
    assert list(res)[:3] == ["ok", "exit_code", "mode"] and res["speeds"]["decoder_epoch_s"] == 0.25
    assert lines == [
        "resume exact: True; featurize on None: fp32 None crops/s, bf16 None; decoder epoch 0.25 s; "
        "joint None s/batch; caption None photos/s"
    ]

    inexact = passing_results()  # every step ran, but a check failed: exit 2, with the reason
    inexact["resume"]["joint"] = {"exact": False, "repeat_exact": True, "explanation": "state is lost on resume"}
    inexact["features"]["synth"]["cli"] = {"within_tolerance": False, "rel_max_abs_diff": 0.5, "min_cosine": 0.9}
    res, lines = assemble(inexact)
    assert res["exit_code"] == 2 and res["resume_exact"] is False
    assert res["failures"] == [
        "features.synth.cli: accelerator store differs from the CPU store beyond tolerance "
        "(rel 0.5, min cosine 0.900000)",
        "resume.joint: state is lost on resume",
    ]
    assert lines[1:] == [f"FAILED: {f}" for f in res["failures"]]

    broken = passing_results()  # a step failed, another had no time left: exit 1
    broken["steps"]["joint_ref"].update(status="failed", rc=3)
    broken["steps"]["caption"] = {
        "status": "skipped",
        "rc": None,
        "reason": "budget of 300s spent",
        "out_of_time": True,
    }
    res, _ = assemble(broken)
    assert res["exit_code"] == 1 and res["skipped"] == ["caption: budget of 300s spent"]
    assert res["failures"] == [
        "step joint_ref failed (rc 3); see gpu_check.log",
        "out of time: 1 step(s) skipped (caption); raise BUDGET_S",
    ]

    on_gpu = passing_results()  # CUDA was there, but a step did not use it
    on_gpu["env"] = {"cuda_available": True}
    on_gpu["steps"]["decoder_ref"]["gpu_used"] = False
    on_gpu["steps"]["joint_ref"]["gpu_used"] = True
    res, _ = assemble(on_gpu)
    assert res["exit_code"] == 0 and res["observations"] == [
        "decoder_ref ran on the CPU although CUDA is available",
        "caption: GPU use not measured (no nvidia-smi)",
    ]


def test_bad_arguments_stop_before_anything_runs(tmp_path):
    script = ["bash", str(ROOT / "bench" / "gpu_check.sh")]
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable}
    bad = subprocess.run([*script, "--flickr", str(tmp_path)], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"gpu_check: --flickr {tmp_path} has no captions.txt "
        "(expected Flickr8k's Kaggle layout: captions.txt + images/)"
    )
    unknown = subprocess.run([*script, "--gpu"], env=env, capture_output=True, text=True)
    assert unknown.returncode == 2 and "unrecognized arguments: --gpu" in unknown.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_gpu_check_dry_run_passes_and_writes_every_result(tmp_path):
    # BUDGET_S is the device's time; on CPU the dry run's time depends on the load, which is not under test.
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PY": sys.executable, "TMPDIR": str(tmp_path), "BUDGET_S": "850"}
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


def test_gpu_use_is_seen_from_nvidia_smi(tmp_path, monkeypatch):
    """A step counts as using the GPU when nvidia-smi lists a compute process or the memory in use
    grows by more than 200 MiB while it runs (here a stand-in nvidia-smi reads both from files)."""
    import time

    from bench.gpu_check import GpuWatch, gpu_memory_mib, have_nvidia_smi

    smi = tmp_path / "nvidia-smi"
    smi.write_text(
        "#!/bin/sh\n"
        f'case "$1" in -L) echo "GPU 0: H200 (UUID: x)";; --query-gpu=*) cat {tmp_path}/mem;; '
        f"--query-compute-apps=*) cat {tmp_path}/apps;; esac\n"
    )
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    (tmp_path / "mem").write_text("1000\n24\n")
    (tmp_path / "apps").write_text("")
    assert have_nvidia_smi() and gpu_memory_mib() == 1024

    def watched(mem: str, apps: str) -> bool:
        (tmp_path / "mem").write_text("1000\n24\n")
        with GpuWatch() as watch:
            time.sleep(0.3)  # the baseline is read first
            (tmp_path / "mem").write_text(mem)
            (tmp_path / "apps").write_text(apps)
            time.sleep(1.2)
        (tmp_path / "apps").write_text("")
        return watch.busy

    assert watched("1100\n24\n", "") is False  # +100 MiB: not this step
    assert watched("1300\n24\n", "") is True
    assert watched("1000\n24\n", "4242\n") is True
