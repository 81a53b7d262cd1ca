"""What each rank runs in tests/test_distributed.py (gloo, CPU processes).

Every worker builds the same model on every rank from the same seed, so a rank can compute the
single-process answer itself and compare its own shard with it.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

import fastopt
from fastopt.optim import AdamW
from tests.helpers import assert_matches_torch
from tests.models import loss_of, make_model

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # a stuck collective fails the test, never hangs it


def launch(worker, world_size: int, *args) -> None:
    """Run ``worker(rank, world_size, *args)`` in ``world_size`` processes; re-raises a failure."""
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{os.path.join(tmp, 'rendezvous')}"
        mp.start_processes(_entry, args=(worker, world_size, init, args), nprocs=world_size, start_method="spawn")


def _entry(rank, worker, world_size, init, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    worker(rank, world_size, *args)
    # Every rank done before any tears down: gloo aborts a rank whose peer left mid-teardown.
    dist.barrier()
    dist.destroy_process_group()
    # And no interpreter teardown: a rank sometimes aborted there ("terminate called without an
    # active exception": a gloo thread still joinable when its owner was destroyed), after its
    # work had passed. The worker's result is in already: a failure raised above.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _assert_close(actual, expected, what, **tol):
    torch.testing.assert_close(actual, expected, msg=lambda m: f"rank {dist.get_rank()}: {what}: {m}", **tol)


def _shard(model):
    """FSDP2 the usual way: each transformer block (or, in an MLP, each Linear), then the root."""
    blocks = [m for m in model.modules() if isinstance(m, torch.nn.TransformerEncoderLayer)]
    for module in blocks or [m for m in model.modules() if isinstance(m, torch.nn.Linear)]:
        fully_shard(module)
    fully_shard(model)
    return model


# --------------------------------------------------------------------------- DDP


def ddp_matches_torch(rank, world_size):
    base = make_model("mlp")
    ours_model = DistributedDataParallel(copy.deepcopy(base))
    torch_model = DistributedDataParallel(copy.deepcopy(base))
    ours = AdamW(ours_model.parameters(), lr=3e-3, max_grad_norm=0.5)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, foreach=False)
    for step in range(5):
        batch_step = 100 * rank + step  # each rank its own data: DDP averages the grads
        ours.zero_grad()
        loss_of("mlp", ours_model, batch_step).backward()
        theirs.zero_grad()
        loss_of("mlp", torch_model, batch_step).backward()
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.5, foreach=False)
        ours.step()
        theirs.step()
        assert_matches_torch(ours.stats["grad_norm"], torch_norm, f"rank {rank}: grad norm")
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        assert_matches_torch(p, q, f"rank {rank}: params differ")


# --------------------------------------------------------------------------- FSDP2


def fsdp_matches_torch(rank, world_size, model_name):
    base = make_model(model_name)
    ours_model = _shard(copy.deepcopy(base))
    torch_model = _shard(copy.deepcopy(base))
    ours = AdamW(ours_model.parameters(), lr=3e-3, max_grad_norm=0.5)
    theirs = torch.optim.AdamW(torch_model.parameters(), lr=3e-3, foreach=False)
    for step in range(4):
        batch_step = 100 * rank + step
        for model, optimizer in ((ours_model, ours), (torch_model, theirs)):
            optimizer.zero_grad()
            loss_of(model_name, model, batch_step).backward()

        torch_grads = [p.grad for p in torch_model.parameters()]
        full_norms = torch.stack([g.full_tensor().norm() for g in torch_grads])
        total, norms = fastopt.multi_tensor_norm(torch_grads, per_tensor=True)
        assert type(total) is torch.Tensor and type(norms) is torch.Tensor  # plain, replicated
        _assert_close(norms, full_norms, "per-tensor norms of sharded grads")

        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.5, foreach=False).full_tensor()
        _assert_close(total, torch_norm, "multi_tensor_norm vs torch's clip_grad_norm_")
        ours.step()
        theirs.step()
        _assert_close(ours.stats["grad_norm"], torch_norm, "in-step grad norm")
    for p, q in zip(ours_model.parameters(), torch_model.parameters()):
        _assert_close(p.to_local(), q.to_local(), "params", rtol=1e-5, atol=1e-6)


def fsdp_clip_grad_norm_returns_a_plain_global_norm(rank, world_size):
    model = _shard(make_model("mlp"))
    loss_of("mlp", model, rank).backward()
    expected = torch.linalg.vector_norm(torch.stack([p.grad.full_tensor().norm() for p in model.parameters()]))
    locals_before = [p.grad.to_local().clone() for p in model.parameters()]
    total = fastopt.clip_grad_norm_(model.parameters(), 0.1)
    assert type(total) is torch.Tensor
    _assert_close(total, expected, "clip_grad_norm_ total")
    coef = 0.1 / (expected + 1e-6)
    for p, before in zip(model.parameters(), locals_before):
        _assert_close(p.grad.to_local(), before * coef, "clipped local shard", rtol=1e-5, atol=1e-7)


def dtensor_agc_matches_single_process(rank, world_size, placement_name, unitwise):
    mesh = init_device_mesh("cpu", (world_size,))
    placement = {"shard0": Shard(0), "shard1": Shard(1), "replicate": Replicate()}[placement_name]
    torch.manual_seed(0)
    shapes = [(8, 12), (16, 4), (4, 8, 3, 3)]
    weights = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) * 0.03 for s in shapes]
    grads[0][::2] *= 100  # some units clipped, some not
    grads[2][1] *= 100
    expected = [g.clone() for g in grads]
    fastopt.ops.adaptive_clip_(weights, expected, unitwise=unitwise)  # single process, full tensors

    dweights = [distribute_tensor(w, mesh, [placement]) for w in weights]
    dgrads = [distribute_tensor(g, mesh, [placement]) for g in grads]
    fastopt.ops.adaptive_clip_(dweights, dgrads, unitwise=unitwise)
    for got, want in zip(dgrads, expected):
        _assert_close(got.full_tensor(), want, f"AGC on {placement_name} DTensors", rtol=1e-5, atol=1e-7)


def overflow_on_one_rank_skips_every_rank(rank, world_size):
    model = _shard(make_model("mlp"))
    optimizer = AdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    scaler = fastopt.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer.zero_grad()
    scaler.scale(loss_of("mlp", model, rank)).backward()
    if rank == world_size - 1:  # an overflow in one rank's shard only
        next(model.parameters()).grad.to_local()[0].fill_(float("inf"))
    before = [p.to_local().clone() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert scaler.step_skipped.item(), f"rank {rank} did not skip"
    assert optimizer.stats["skipped_steps"].item() == 1
    assert scaler.get_scale() == 512.0
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p.to_local(), b), f"rank {rank} changed a param on a skipped step"


# --------------------------------------------------------------------------- ZeRO-style split


def zero_split_matches_single_process(rank, world_size):
    """Every rank holds the whole model (same seed, same batch) but steps only its share of the
    params; with process_group the norm, the clip and the trajectory are the single-process ones."""
    model = make_model("mlp")
    reference_model = copy.deepcopy(model)
    params = list(model.parameters())
    mine = params[rank::world_size]
    ours = AdamW(mine, lr=3e-3, max_grad_norm=0.5, process_group=dist.group.WORLD)
    reference = AdamW(reference_model.parameters(), lr=3e-3, max_grad_norm=0.5)
    for step in range(4):
        for m, optimizer in ((model, ours), (reference_model, reference)):
            optimizer.zero_grad()
            loss_of("mlp", m, step).backward()
        split_norm = fastopt.multi_tensor_norm([p.grad for p in mine], process_group=dist.group.WORLD)
        full_norm = fastopt.multi_tensor_norm([p.grad for p in reference_model.parameters()])
        _assert_close(split_norm, full_norm, "norm over a ZeRO split")
        ours.step()
        reference.step()
        with torch.no_grad():  # all-gather: each rank broadcasts the params it owns
            for i, p in enumerate(params):
                dist.broadcast(p, src=i % world_size)
    for p, q in zip(model.parameters(), reference_model.parameters()):
        _assert_close(p, q, "params", rtol=1e-5, atol=1e-6)


def zero_split_overflow_on_one_rank_skips_every_rank(rank, world_size):
    model = make_model("mlp")
    mine = list(model.parameters())[rank::world_size]
    optimizer = AdamW(mine, lr=1e-2, process_group=dist.group.WORLD)
    scaler = fastopt.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(loss_of("mlp", model, 0)).backward()
    if rank == 0:
        mine[0].grad.view(-1)[0] = float("nan")
    before = [p.detach().clone() for p in mine]
    scaler.step(optimizer)
    assert scaler.step_skipped.item(), f"rank {rank} did not skip"
    for p, b in zip(mine, before):
        assert torch.equal(p, b), f"rank {rank} changed a param on a skipped step"
