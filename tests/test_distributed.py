"""fastopt under torch.distributed: DDP, FSDP2 (DTensor) and ZeRO-style splits, in 2 and 4 CPU
processes with the gloo backend. Each worker asserts on its own rank; a failure on any rank fails
the test, and a stuck collective times out instead of hanging."""

import pytest
import torch.distributed as dist

from tests import distributed_workers as workers

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"),
]


def test_ddp_trajectory_equals_torch_bitwise():
    workers.launch(workers.ddp_matches_torch, 2)


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("model_name", ["mlp", "transformer"])
def test_fsdp2_norms_and_trajectory_equal_torch(world_size, model_name):
    workers.launch(workers.fsdp_matches_torch, world_size, model_name)


def test_fsdp2_clip_grad_norm_returns_a_plain_global_norm():
    workers.launch(workers.fsdp_clip_grad_norm_returns_a_plain_global_norm, 2)


@pytest.mark.parametrize("placement", ["shard0", "shard1", "replicate"])
@pytest.mark.parametrize("unitwise", [True, False], ids=["unitwise", "whole-tensor"])
def test_agc_on_sharded_tensors_equals_single_process(placement, unitwise):
    workers.launch(workers.dtensor_agc_matches_single_process, 2, placement, unitwise)


def test_fsdp2_overflow_on_one_rank_skips_every_rank():
    workers.launch(workers.overflow_on_one_rank_skips_every_rank, 2)


@pytest.mark.parametrize("world_size", [2, 4])
def test_zero_split_norm_and_trajectory_equal_single_process(world_size):
    workers.launch(workers.zero_split_matches_single_process, world_size)


def test_zero_split_overflow_on_one_rank_skips_every_rank():
    workers.launch(workers.zero_split_overflow_on_one_rank_skips_every_rank, 2)
