"""examples/train_gpt.py: its smallest config trains, resumes bit-exactly and matches torch."""

import importlib.util
import pathlib

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
