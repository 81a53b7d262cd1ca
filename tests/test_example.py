"""examples/train_gpt.py: its smallest config trains, resumes bit-exactly and matches torch; its help shows
every default and its first line comes before the slow setup."""

import importlib.util
import pathlib
import re
import subprocess
import sys
import time

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_gpt.py"
TINY = ["--width", "32", "--layers", "1", "--heads", "2", "--context", "16", "--batch-size", "8", "--log-every", "100"]


@pytest.fixture(scope="module")
def train_gpt():
    spec = importlib.util.spec_from_file_location("train_gpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smallest_config_trains_and_plots(train_gpt, tmp_path):
    metrics = train_gpt.main(["--steps", "12", "--lr", "1e-2", "--out", str(tmp_path), *TINY])["fastopt"]
    assert len(metrics["loss"]) == 12
    assert sum(metrics["loss"][-3:]) < sum(metrics["loss"][:3])  # it learns
    assert (tmp_path / "metrics.json").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "training.png").stat().st_size > 10_000


def test_resume_gives_identical_losses(train_gpt, tmp_path):
    full = train_gpt.main(["--steps", "8", "--out", str(tmp_path / "full"), *TINY])["fastopt"]
    train_gpt.main(["--steps", "8", "--stop-at", "4", "--out", str(tmp_path / "preempted"), *TINY])
    checkpoint = tmp_path / "preempted" / "checkpoint.pt"
    assert torch.load(checkpoint, weights_only=False)["runs"][0]["step"] == 4
    resumed = train_gpt.main(["--steps", "8", "--resume", str(checkpoint), "--out", str(tmp_path / "resumed"), *TINY])
    assert resumed["fastopt"]["loss"] == full["loss"]  # bit for bit: steps 0-3 restored, 4-7 recomputed
    assert resumed["fastopt"]["grad_norm"] == full["grad_norm"]
    assert resumed["fastopt"]["skipped"] == full["skipped"]


@pytest.mark.parametrize("clip", ["norm", "agc"])
def test_compare_torch_runs_the_same_steps(train_gpt, tmp_path, clip):
    results = train_gpt.main(
        ["--steps", "6", "--compare-torch", "--clip", clip, "--max-grad-norm", "0.3", "--out", str(tmp_path), *TINY]
    )
    ours, theirs = (torch.tensor(results[k]["loss"]) for k in ("fastopt", "torch"))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "lion"])
def test_each_optimizer_runs_the_same_steps_as_its_torch_counterpart(train_gpt, tmp_path, optimizer):
    """--optimizer: fastopt's Adam, SGD or Lion (clipping inside the step) against torch.optim's
    Adam and SGD and a foreach Lion (the benchmark's), after torch's clip_grad_norm_."""
    results = train_gpt.main(["--optimizer", optimizer, "--steps", "6", "--compare-torch", "--max-grad-norm", "0.3",
                              "--out", str(tmp_path), *TINY])  # fmt: skip
    ours, theirs = (torch.tensor(results[k]["loss"]) for k in ("fastopt", "torch"))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert ours[-1] < ours[0]
    args = train_gpt.parse_args(["--optimizer", optimizer])
    assert (args.lr, args.weight_decay) == tuple(train_gpt.OPTIMIZERS[optimizer][2].values())
    assert train_gpt.parse_args(["--optimizer", optimizer, "--lr", "0.5"]).lr == 0.5


def test_help_shows_every_default():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "--steps STEPS optimizer steps (default: " in text
    assert "--batch-size BATCH_SIZE sequences per micro batch (default: 16)" in text
    assert "--clip {norm,agc,none} clip by global norm or AGC (default: norm)" in text
    assert "--optimizer {adamw,adam,sgd,lion}" in text and "(default: adamw)" in text
    assert "peak learning rate (default: by --optimizer: adamw 0.003, adam 0.003, sgd 0.3, lion 0.001)" in text
    blocks = re.split(r"\n  (?=--)", result.stdout.split("options:", 1)[1])[1:]  # one per option
    options = {block.split()[0]: " ".join(block.split()) for block in blocks}
    missing = [o for o, block in options.items() if o != "--resume" and "(default: " not in block]
    assert len(options) > 20 and not missing


def test_first_line_comes_before_the_corpus_and_models_are_built(tmp_path):
    """Not a timing test: a generous bound (the machine may be shared) on when the first line
    appears, which the script prints before its slow setup."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), "--steps", "2", "--out", str(tmp_path), *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        first = process.stdout.readline()
        waited = time.monotonic() - started
        rest, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert first.startswith("train_gpt: 2 steps of 2 x 8 sequences of 16 characters"), first + rest
    assert waited < 60, f"first line after {waited:.0f} s"
    assert process.returncode == 0 and "step     1 | fastopt: loss" in rest and "step     2 |" in rest
