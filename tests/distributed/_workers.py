"""Worker bodies for the 2-process tests, and the data/steps they share with the references.

The scenario (float64, an MLP 5 → 7 → 3, λ = ``STRENGTH``):

1. MAS consolidated on task 1 (inputs only) at the initial weights;
2. EWC (separate mode) consolidated on task 1, weights moved (``move_``), EWC consolidated on
   task 2, weights moved again;
3. one training step ``ce(model(x_r), y_r) + ewc.penalty()`` (autograd path), one with
   ``ce`` then ``ewc.add_penalty_grad_()`` (fast path) and one with ``ce`` then
   ``optimizer.step()`` of an optimizer ``ewc`` is attached to (step pre-hook).

Rank ``r`` gets its own, differently sized share of every task (``rank_share``), in two
batches on each rank (FSDP2 runs collectives in every forward, so the batch counts match).
Everything the parent compares is gathered to full tensors and saved per rank.
"""
from __future__ import annotations

import io

import torch
import torch.nn.functional as F

import fastcl
from fastcl._names import named_parameters
from fastcl.distributed import is_dtensor, local_shard, local_tensor, memory_estimate

STRENGTH = 3.0
TASK_SIZES = (9, 7)  # samples of each task on rank 0 and rank 1 (16 in all)
BATCHES = {0: (5, 4), 1: (4, 3)}  # batch sizes on each rank: two batches each


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def task(seed: int):
    """All the data of one task: ``(x [16, 5], y [16])``."""
    g = torch.Generator().manual_seed(seed)
    n = sum(TASK_SIZES)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def rank_share(data, rank: int):
    """Rank ``rank``'s rows of ``data``: the first 9 rows on rank 0, the other 7 on rank 1."""
    x, y = data
    start = sum(TASK_SIZES[:rank])
    return x[start : start + TASK_SIZES[rank]], y[start : start + TASK_SIZES[rank]]


def rank_batches(data, rank: int, inputs_only: bool = False):
    x, y = rank_share(data, rank)
    out, start = [], 0
    for size in BATCHES[rank]:
        xb, yb = x[start : start + size], y[start : start + size]
        out.append(xb if inputs_only else (xb, yb))
        start += size
    return out


def noise(model, step: int) -> dict[str, torch.Tensor]:
    """A full-size float64 displacement per parameter, the same on every rank and in the reference."""
    out = {}
    for i, (name, p) in enumerate(named_parameters(model).items()):
        g = torch.Generator().manual_seed(1000 * step + i)
        out[name] = 0.3 * torch.randn(tuple(p.shape), generator=g, dtype=torch.float64)
    return out


def move_(model, step: int) -> None:
    """Stand-in for training: θ += noise(step) (each rank moves its own shard under FSDP2)."""
    with torch.no_grad():
        for name, d in noise(model, step).items():
            p = named_parameters(model)[name]
            local_tensor(p).add_(local_shard(d, p) if is_dtensor(p) else d)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if is_dtensor(t) else t).detach().clone()


def gather(d: dict) -> dict:
    return {n: full(t) for n, t in d.items()}


def grads(model) -> dict:
    return {n: full(p.grad) for n, p in named_parameters(model).items()}


def zero_grad(model) -> None:
    for p in model.parameters():
        p.grad = None


# --------------------------------------------------------------------------- the scenario


def scenario(rank, wrapped, res, on_consolidated=None):
    """Steps 1-3 on ``wrapped`` (DDP or FSDP2); fills ``res`` with gathered results."""
    task1, task2, train = task(1), task(2), task(3)

    l2sp = fastcl.L2SP(wrapped, STRENGTH)  # anchored at the initial weights
    mas = fastcl.MAS(wrapped, STRENGTH)
    mas.consolidate(rank_batches(task1, rank, inputs_only=True))
    res["mas"] = gather(mas.importance)

    ewc = fastcl.EWC(wrapped, STRENGTH)
    ewc.consolidate(rank_batches(task1, rank))
    res["fisher1"] = gather(ewc.fisher)
    move_(wrapped, 1)
    ewc.consolidate(rank_batches(task2, rank))
    res["grads_untouched"] = all(p.grad is None and p.requires_grad for p in wrapped.parameters())
    res["fisher_sum"] = gather(ewc.fisher)
    res["anchor_mean"] = gather(ewc.anchors)
    res["constant"] = ewc._constant
    if on_consolidated is not None:
        on_consolidated()
    move_(wrapped, 2)

    res["l2sp"] = l2sp.penalty().item()
    x, y = rank_share(train, rank)
    zero_grad(wrapped)
    task_loss = F.cross_entropy(wrapped(x), y)
    penalty = ewc.penalty()  # after the forward, as in a training loop (FSDP2's root group is unsharded now)
    (task_loss + penalty).backward()
    res["penalty"] = penalty.item()
    res["grad_autograd"] = grads(wrapped)

    zero_grad(wrapped)
    F.cross_entropy(wrapped(x), y).backward()
    res["penalty_fast"] = ewc.add_penalty_grad_().item()
    res["grad_fast"] = grads(wrapped)
    zero_grad(wrapped)

    opt = torch.optim.SGD(wrapped.parameters(), lr=0.0)
    ewc.attach(opt)
    opt.register_step_pre_hook(lambda *_: res.update(grad_attach=grads(wrapped)))  # runs after fastcl's hook
    F.cross_entropy(wrapped(x), y).backward()
    opt.step()
    res["penalty_attach"] = ewc.last_penalty.item()
    ewc.detach()
    zero_grad(wrapped)

    # state_dict round trips: through torch.save, and as full (gathered) tensors
    buffer = io.BytesIO()
    torch.save(ewc.state_dict(), buffer)
    buffer.seek(0)
    restored = fastcl.EWC(wrapped, STRENGTH)
    restored.load_state_dict(torch.load(buffer, weights_only=False))
    res["penalty_restored"] = restored.penalty().item()
    state = ewc.state_dict()
    state["anchors"], state["importance"] = gather(state["anchors"]), gather(state["importance"])
    from_full = fastcl.EWC(wrapped, STRENGTH)
    from_full.load_state_dict(state)
    res["penalty_from_full"] = from_full.penalty().item()
    res["restored_equal"] = all(
        torch.equal(local_tensor(a).detach(), local_tensor(b).detach())
        for reg in (restored, from_full)
        for a, b in zip([*ewc.anchors.values(), *ewc.fisher.values()], [*reg.anchors.values(), *reg.fisher.values()])
    )
    return ewc


def ddp_worker(rank, world_size, outdir):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    ddp = DDP(model)
    calls = []

    def counting_hook(state, bucket):
        calls.append(1)
        return allreduce_hook(state, bucket)

    ddp.register_comm_hook(None, counting_hook)
    res = {}
    scenario(rank, ddp, res, on_consolidated=lambda: res.setdefault("comm_calls_during_consolidate", len(calls)))
    res["comm_calls_after_training"] = len(calls)

    # a failure on one rank (non-finite loss on rank 1) makes every rank raise, none waits forever
    broken = rank_batches(task(4), rank)
    if rank == 1:
        broken[1] = (broken[1][0] * float("nan"), broken[1][1])
    ewc = fastcl.EWC(ddp, STRENGTH)
    try:
        ewc.consolidate(broken)
    except (ValueError, RuntimeError) as exc:
        res["failure"] = f"{type(exc).__name__}: {exc}"
    res["failure_left_unconsolidated"] = not ewc.consolidated
    res["memory"] = memory_estimate(ddp)
    torch.save(res, outdir / f"rank{rank}.pt")


def fsdp2_worker(rank, world_size, outdir):
    try:
        try:
            from torch.distributed.fsdp import fully_shard
        except ImportError:
            from torch.distributed._composable.fsdp import fully_shard
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world_size,))
        model = make_model()
        # the first layer is its own FSDP group; the last belongs to the root's group, whose
        # parameters FSDP2 leaves unsharded between forward and backward
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
    except Exception as exc:  # FSDP2 on CPU/gloo unavailable in this torch
        if rank == 0:
            (outdir / "skip.txt").write_text(f"FSDP2 (fully_shard on a CPU gloo mesh) unavailable: {type(exc).__name__}: {exc}")
        return
    res = {}
    ewc = scenario(rank, model, res)
    res["memory"] = memory_estimate(model)
    res["memory_bf16"] = memory_estimate(model, torch.bfloat16)
    res["placements_match"] = all(
        is_dtensor(t) and tuple(t.placements) == tuple(p.placements) and local_tensor(t).shape == local_tensor(p).shape
        for store in (ewc.fisher, ewc.anchors)
        for n, p in named_parameters(model).items()
        for t in [store[n]]
    )
    res["stored_elements"] = sum(local_tensor(t).numel() for store in (ewc.fisher, ewc.anchors) for t in store.values())
    torch.save(res, outdir / f"rank{rank}.pt")
