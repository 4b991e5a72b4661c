"""scripts/gpu_check.sh: the dry run (every stage on CPU at tiny sizes) and the harness's own guarantees
(a hung stage is killed with its children and recorded; the budget skips what no longer fits)."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gc = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look the module up
_spec.loader.exec_module(gc)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--results-dir", str(tmp / "res"),
                       "--work", str(tmp / "work")], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                      env=dict({k: v for k, v in os.environ.items() if k != "OUT"}, PYTHON=sys.executable))
    reports = sorted((tmp / "res").glob("gpu_check_cpu-dry-run_*.json"))
    assert len(reports) == 1, r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads(reports[0].read_text()), reports[0].with_suffix(".md").read_text()


def test_dry_run_runs_every_stage(dry_run):
    r, report, md = dry_run
    stages = report["stages"]
    assert list(stages) == [s.name for s in gc.STAGES]
    failed = {n: (s.get("error"), s.get("log_tail")) for n, s in stages.items()
              if s["status"] not in ("pass", "skipped")}
    assert not failed and r.returncode == 0, (failed, r.stdout[-2000:])
    skipped = {n for n, s in stages.items() if s["status"] == "skipped"}
    no_tool = not (ROOT / "benchmarks" / "kernel_static.py").is_file()
    assert skipped == {"multi_gpu", "scan_compiled"} | ({"kernel_static"} if no_tool else set())
    assert all(stages[n]["reason"] for n in skipped)
    assert report["dry_run"] and report["setup"]["missing"] == []
    for name in stages:
        assert name in md


def test_dry_run_figures(dry_run):
    _, report, _ = dry_run
    fig = {n: s["figures"] for n, s in report["stages"].items()}
    assert fig["env"]["torch"] == torch.__version__ and fig["env"]["cuda_available"] is False
    assert fig["env"]["ceilings"]["copy_GBps"] > 0 and fig["env"]["ceilings"]["matmul_TFLOPs"] > 0

    # pytest -m gpu on CPU: every gpu test collected and skipped, none failed
    counts = fig["pytest_gpu"]["counts"]
    assert counts["skipped"] > 0 and counts["failed"] == counts["error"] == 0
    assert all("test_gpu" in t for t in fig["pytest_gpu"]["tests"])

    # scan: the derived speedup is the ratio of scan.py's own raw timings
    for name, peer in (("scan", "cpu"), ("scan_reference", "reference")):
        row = fig[name]["shapes"][0]
        raw = fig[name]["raw"][0]["results"][0]["backends"]
        assert row["backends"]["triton"]["fwd_ms"] > 0
        ratio = gc._timing(raw[peer], "fwd_bwd") / gc._timing(raw["triton"], "fwd_bwd")
        assert row["triton_speedup_over"][peer]["fwd_bwd"] == pytest.approx(ratio)

    for name in ("train_zigma1_bf16", "train_zigma1_arcee_bf16", "train_zigma1_tf32", "train_zigma1_arcee_tf32"):
        t = fig[name]
        assert t["batch"] == 8 and t["oom_batches"] == [] and t["loss_finite"] and t["loss_falls"]
        assert len(t["loss"]) == t["steps"] and t["timed_steps"] == t["steps"] - t["warmup_steps"]
        assert t["images_per_s"] == pytest.approx(t["batch"] * t["timed_steps"] / t["wall_s"])
        # the phases are medians of parts of each step: together at most the mean step (+ the median's slack)
        assert 0 < t["forward_ms"] + t["backward_ms"] + t["optimizer_ms"] <= 1.5 * t["step_ms"]
    assert fig["train_zigma1_arcee_bf16"]["model"]["state_chain"] == "arcee"
    assert fig["train_zigma1_bf16"]["model"]["state_chain"] == "none"
    assert set(report["summary"]["arcee_overhead"]) == {"bf16", "tf32"}

    if (ROOT / "benchmarks" / "kernel_static.py").is_file():
        records = fig["kernel_static"]["records"]
        assert records and all(r["warp_instr_per_update"] > 0 for r in records)

    s = fig["sample"]
    assert s["weights"] == f"trained by {gc.SAMPLE_SOURCE}" and s["images"] == 8
    assert s["samplers"]["heun"]["nfe_per_batch"] == [2 * 4 - 1] * 2  # Heun: 2 steps - 1 evaluations
    assert all(n >= 6 for n in s["samplers"]["dopri5"]["nfe_per_batch"])  # dopri5: >= 6 stages per step
    assert s["samplers"]["dopri5"]["images_per_s"] > 0


def test_hung_stage_is_killed_with_its_children(tmp_path):
    pidfile = tmp_path / "pid"
    hang = ["bash", "-c", f"sleep 300 & echo $! > {pidfile}; echo started; wait"]
    t0 = time.monotonic()
    r = gc.run_stage("hang", hang, tmp_path, timeout=2)
    assert r["status"] == "timeout" and time.monotonic() - t0 < 15
    assert "started" in r["log_tail"] and "killed after" in r["error"]
    grandchild = Path(f"/proc/{pidfile.read_text().strip()}/status")
    deadline = time.monotonic() + 5
    while grandchild.exists() and "zombie" not in grandchild.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not grandchild.exists() or "zombie" in grandchild.read_text()

    r = gc.run_stage("boom", [sys.executable, "-c", "raise SystemExit('kernel exploded')"], tmp_path, timeout=30)
    assert r["status"] == "fail" and "kernel exploded" in r["log_tail"]


def test_budget_skips_what_does_not_fit(tmp_path, capsys):
    rc = gc.main(["--dry-run", "--only", "env,sample", "--budget", "20", "--results-dir", str(tmp_path),
                  "--work", str(tmp_path / "work")])
    report = json.loads(next(tmp_path.glob("gpu_check_*.json")).read_text())
    assert rc == 0 and list(report["stages"]) == ["env", "sample"]
    assert report["stages"]["env"]["status"] == "skipped" and "budget" in report["stages"]["env"]["reason"]


def test_parse_verbose_keeps_the_tests_that_finished():
    text = ("tests/test_scan_triton.py::test_gpu_matches_reference[a] PASSED    [ 6%]\n"
            "[gw1] [ 12%] FAILED tests/test_scan_triton.py::test_gpu_matches_reference[b]\n"
            "tests/test_scan_triton.py::test_gpu_large_batch_offsets SKIPPED (needs a CUDA device)\n"
            "collecting ... collected 73 items / 57 deselected / 16 selected\n")
    assert gc.parse_verbose(text) == {
        "tests/test_scan_triton.py::test_gpu_matches_reference[a]": {"outcome": "passed"},
        "tests/test_scan_triton.py::test_gpu_matches_reference[b]": {"outcome": "failed"},
        "tests/test_scan_triton.py::test_gpu_large_batch_offsets": {"outcome": "skipped"}}
