"""`make gpu-check` without a GPU: its plan stays inside one GPU slot, it refuses to run without a
GPU, and what comes back from the GPU machine renders into bench/RESULTS.md.

The GPU machine allows 10 minutes per command and 15 minutes in all (its start included): the main
plan must end within 8 minutes, the optional second one within 6.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
RESULTS = ROOT / "scripts" / "gpu_results.py"
LIMITS = {"main": 480, "extra": 360}

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def dry_run(plan: str) -> tuple[list[tuple[str, int]], int]:
    done = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--plan", plan], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    total = re.fullmatch(r"total: (\d+) s", lines[-1])
    assert total, f"last line is not 'total: N s': {lines[-1]!r}"
    steps = [(m.group(1), int(m.group(2))) for line in lines if (m := re.match(r"\s+(\S+)\s+(\d+) s\s", line))]
    return steps, int(total.group(1))


@pytest.mark.parametrize("plan", sorted(LIMITS))
def test_plan_fits_the_gpu_slot(plan):
    steps, total = dry_run(plan)
    assert total == sum(cap for _, cap in steps)
    assert total <= LIMITS[plan], f"plan {plan} needs {total} s, more than its {LIMITS[plan]} s"
    names = [name for name, _ in steps]
    assert names[0] == "versions" and names[-1] == "finalize"
    assert all(cap >= 15 for _, cap in steps), "every step gets real time"


def test_main_plan_confirms_both_backends():
    names = [name for name, _ in dry_run("main")[0]]
    for step in ("build", "tests", "optests-cuda", "optests-triton", "memcheck", "bench-fp32"):
        assert step in names
    extra = [name for name, _ in dry_run("extra")[0]]
    for step in ("racecheck", "synccheck", "bench-bf16"):
        assert step in extra and step not in names


def test_refuses_to_run_without_a_gpu(monkeypatch):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has nvidia-smi")
    done = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "no GPU here" in done.stderr


def test_sanitizer_driver_imports_the_checkout_from_any_folder(tmp_path):
    """The driver runs as `python scripts/sanitizer_driver.py`: sys.path[0] is scripts/, yet the
    checkout's fastopt (where an in-place build of fastopt._C lives) must be the one imported."""
    probe = (
        "import runpy, sys; sys.argv = ['sanitizer_driver.py', '--help'];"
        f"\ntry:\n    runpy.run_path({str(ROOT / 'scripts' / 'sanitizer_driver.py')!r}, run_name='__main__')"
        "\nexcept SystemExit:\n    pass"
        "\nimport fastopt; print(fastopt.__file__)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pathlib.Path(done.stdout.strip().splitlines()[-1]).resolve().is_relative_to(ROOT)


def test_returned_files_render_into_results_md(tmp_path):
    """A log folder as gpu_check.sh leaves it (steps, a junit XML, a real benchmark JSON, made here
    on the CPU), summarised as on the GPU machine, then rendered as on the CPU machine."""
    logs = tmp_path / "logs-main"
    logs.mkdir()
    bench_out = tmp_path / "bench"
    subprocess.run(
        [sys.executable, "-m", "fastopt", "bench", "--device", "cpu", "--size", "tiny", "--workloads", "many-small",
         "--dtypes", "fp32", "--ops", "multi_tensor_norm", "--backends", "torch", "--no-peers", "--quiet",
         "--out", str(bench_out)],
        check=True, capture_output=True, timeout=300, cwd=ROOT,
    )
    shutil.copy(next(bench_out.glob("bench-*.json")), logs / "bench-fp32.json")
    (logs / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="tests.test_x" name="test_ok"/>'
        '<testcase classname="tests.test_x" name="test_bad"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="test_skip"><skipped/></testcase>'
        "</testsuite></testsuites>"
    )
    (logs / "versions.json").write_text(json.dumps(
        {"date": "2026-12-01 10:00 UTC", "device": "NVIDIA H200", "capability": "9.0", "sms": 132, "torch": "2.11.0+cu130",
         "triton": "3.6.0", "driver": "580", "memory": "143771 MiB"}))
    (logs / "steps.tsv").write_text(
        "versions\tok\t2\tH200\t\nbuild\tok\t61\tfastopt/_C.so\t\ntests\tFAIL\t40\tsee log\ttests.xml\n"
        "memcheck\tTIMEOUT\t45\tno summary line\t\nbench-fp32\tok\t50\trows\tbench-fp32.json\n"
    )
    subprocess.run([sys.executable, str(RESULTS), "summarize", "--plan", "main", "--logs", str(logs), "--out",
                    str(tmp_path), "--seconds", "300", "--budget", "475"], check=True, capture_output=True, timeout=120)
    check = json.loads((tmp_path / "gpu-check-main.json").read_text())
    tests = next(s for s in check["steps"] if s["name"] == "tests")
    assert tests["counts"]["passed"] == 1 and tests["counts"]["failed_tests"] == ["tests.test_x::test_bad"]
    summary = (tmp_path / "summary-main.md").read_text()
    assert "overall: FAIL (tests, memcheck)" in summary

    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Results\n")
    subprocess.run([sys.executable, str(RESULTS), "render", str(tmp_path / "gpu-check-main.json"), "--results",
                    str(results_md)], check=True, capture_output=True, timeout=120)
    text = results_md.read_text()
    assert text.startswith("# Results\n")
    assert "## GPU: `make gpu-check`, 2026-12-01" in text
    assert "NVIDIA H200 (sm_90, 132 SMs" in text and "torch 2.11.0+cu130" in text and "triton 3.6.0" in text
    assert "| tests | FAIL | 40 s | 1 passed, 1 failed, 0 errors, 1 skipped |" in text
    assert "Steps that failed: tests, memcheck" in text
    assert "multi_tensor_norm" in text  # the benchmark's own tables
    assert "could not be rendered" not in text
