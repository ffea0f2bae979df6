r"""Distributed training support: DDP and FSDP2 (``fully_shard``, DTensor parameters).

What the strategies do with this module:

* **DDP** (``EWC(ddp_model)``). Parameters are replicated, so anchors and importance are
  full tensors on every rank. The importance pass runs the unwrapped module with
  ``torch.autograd.grad`` (no ``.grad`` accumulation, so DDP's gradient all-reduce never
  fires) on each rank's share of the data, then one all-reduce over DDP's process group
  sums the per-rank ``Σ_n |g_n|^p`` and the sample counts: every rank gets
  ``F = (Σ_r Σ_{n∈r} g_n²) / (Σ_r N_r)``, the Fisher of *all* the data.
* **FSDP2** (``fully_shard``): a parameter is a DTensor whose rank-local shard is
  ``local_tensor(p)``. Anchors and importance are stored as DTensors with the parameter's
  mesh and placements, so each rank holds only its shard (memory per rank ≈ P/world).
  The penalty is evaluated on local shards and its scalar value is summed over the ranks
  that hold different shards (:func:`shard_groups`); gradients are written into the local
  shard of ``p.grad``. The importance pass accumulates full-size sums from the unsharded
  parameters' activations and output gradients, all-reduces them over the mesh and keeps
  the local shard (see :func:`fastcl.importance.diagonal_fisher`).

Only ``Shard(d)`` and ``Replicate()`` placements are supported (FSDP, HSDP); tensor
parallel layouts (``_StridedShard``, ``Partial``) raise ``NotImplementedError``.
"""
from __future__ import annotations

import math
import sys
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "DTensor",  # noqa: F822 - provided lazily by __getattr__
    "all_reduce_sum",
    "as_dtensor_like",
    "collective_device",
    "data_parallel_groups",
    "is_distributed",
    "is_dtensor",
    "local_shard",
    "local_tensor",
    "memory_estimate",
    "shard_groups",
    "shard_like",
]

try:
    import torch.distributed as dist
except ImportError:  # pragma: no cover - torch built without distributed
    dist = None

# torch.distributed.tensor (DTensor) costs ~1 s to import (sympy, the sharding-propagation
# rules), so it is imported only when a DTensor can exist. That test is exact, not a
# guess: a DTensor is an instance of a class defined in that package, so while the
# package is not in sys.modules no object can be a DTensor.
_DTENSOR_MODULES = ("torch.distributed.tensor", "torch.distributed._tensor")
_api: tuple | None = None


def _dtensor_api() -> tuple:
    """``(DTensor, Replicate, Shard)``, importing ``torch.distributed.tensor`` on first use (Nones without it)."""
    global _api
    if _api is None:
        api = (None, None, None)
        if dist is not None and dist.is_available():
            try:  # torch >= 2.5
                from torch.distributed.tensor import DTensor, Replicate, Shard

                api = (DTensor, Replicate, Shard)
            except ImportError:  # torch 2.4
                try:
                    from torch.distributed._tensor import DTensor, Replicate, Shard

                    api = (DTensor, Replicate, Shard)
                except ImportError:  # pragma: no cover
                    pass
        _api = api
    return _api


def __getattr__(name: str):
    """``fastcl.distributed.DTensor`` (the class, or ``None`` without distributed), imported on first access."""
    if name == "DTensor":
        return _dtensor_api()[0]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def is_distributed() -> bool:
    """``True`` when ``torch.distributed`` is available and a default process group exists."""
    return dist is not None and dist.is_available() and dist.is_initialized()


def is_dtensor(t) -> bool:
    """``True`` for a DTensor (an FSDP2 parameter, its gradient, a sharded anchor...)."""
    if _api is None and not any(m in sys.modules for m in _DTENSOR_MODULES):
        return False  # the DTensor class is not even defined yet
    dtensor = _dtensor_api()[0]
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of ``t``: ``t.to_local()`` for a DTensor, ``t`` itself otherwise.

    Differentiable when grad mode is on (the gradient flows back to the DTensor with the
    same placements); under ``torch.no_grad()`` it is the DTensor's own local tensor, so
    in-place writes (e.g. into ``p.grad``) reach the DTensor.
    """
    return t.to_local() if is_dtensor(t) else t


def _placements(t) -> tuple:
    _, Replicate, Shard = _dtensor_api()
    for pl in t.placements:
        if not (type(pl) is Shard or isinstance(pl, Replicate)):
            raise NotImplementedError(
                f"fastcl supports DTensor placements Shard(dim) and Replicate() (FSDP/HSDP); got {t.placements}"
            )
    return tuple(t.placements)


def shard_groups(t) -> tuple:
    """Process groups over which the elements of DTensor ``t`` are split (its ``Shard`` mesh dims).

    Summing a per-rank quantity over these groups (not over replicas) gives the sum over
    all elements exactly once. Empty for a plain tensor.
    """
    if not is_dtensor(t):
        return ()
    mesh = t.device_mesh
    shard = _dtensor_api()[2]
    return tuple(mesh.get_group(i) for i, pl in enumerate(_placements(t)) if type(pl) is shard)


def all_reduce_sum(value, groups: Sequence = ()):
    """Sum ``value`` over every rank of ``groups`` (one all-reduce per group, in order).

    ``value``: a tensor, reduced in place and returned, or a Python number, returned as a
    float (int for an int). No groups: ``value`` unchanged. Over several groups the result
    is the sum over the product of the groups (e.g. both dims of an HSDP mesh).
    """
    if not groups:
        return value
    if isinstance(value, torch.Tensor):
        for g in groups:
            dist.all_reduce(value, op=dist.ReduceOp.SUM, group=g)
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"value must be a tensor or a number, got {type(value).__name__}")
    buf = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.int64, device=collective_device(groups[0]))
    all_reduce_sum(buf, groups)
    return buf.item()


def collective_device(group) -> torch.device:
    """A device the collectives of ``group`` accept (NCCL needs CUDA tensors)."""
    backend = dist.get_backend(group)
    if backend == "nccl" or (isinstance(backend, str) and "nccl" in backend and "gloo" not in backend):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_shard(full: torch.Tensor, like) -> torch.Tensor:
    """The part of ``full`` (shaped like the global DTensor ``like``) that this rank holds.

    ``Shard(d)`` splits dim ``d`` as ``torch.chunk`` does (ranks past the last chunk get
    an empty slice), mesh dims applied in order; ``Replicate()`` keeps everything. This is
    the layout of DTensor and FSDP2. Returns a view of ``full``.
    """
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"full has shape {tuple(full.shape)}, expected the global shape {tuple(like.shape)}")
    mesh = like.device_mesh
    coord = mesh.get_coordinate()
    if coord is None:
        raise ValueError("this rank is not part of the DTensor's device mesh")
    t = full
    shard = _dtensor_api()[2]
    for i, pl in enumerate(_placements(like)):
        if type(pl) is not shard:
            continue
        dim = pl.dim % t.dim()
        chunks = torch.chunk(t, mesh.size(i), dim=dim)
        t = chunks[coord[i]] if coord[i] < len(chunks) else t.narrow(dim, t.shape[dim], 0)
    expected = tuple(like._local_tensor.shape)
    if tuple(t.shape) != expected:  # a layout this function does not reproduce: never guess
        raise NotImplementedError(f"local shard shape {tuple(t.shape)} does not match the DTensor's {expected}")
    return t


def shard_like(value: torch.Tensor, like) -> torch.Tensor:
    """``value`` as the plain local tensor that matches ``like``'s local shard.

    ``like`` a plain tensor: ``value`` (a DTensor is gathered with ``full_tensor()``, a
    collective). ``like`` a DTensor: ``value`` may be a DTensor (redistributed to
    ``like``'s placements when they differ), a full tensor of the global shape (sliced),
    or already the local shard.
    """
    if not is_dtensor(like):
        return value.full_tensor() if is_dtensor(value) else value
    if is_dtensor(value):
        if tuple(value.placements) != tuple(like.placements) or value.device_mesh != like.device_mesh:
            value = value.redistribute(like.device_mesh, like.placements)
        return value.to_local()
    if tuple(value.shape) == tuple(like.shape):
        return local_shard(value, like)
    if tuple(value.shape) == tuple(like._local_tensor.shape):
        return value
    raise ValueError(
        f"tensor of shape {tuple(value.shape)} is neither the global shape {tuple(like.shape)} "
        f"nor the local shard shape {tuple(like._local_tensor.shape)} of the parameter"
    )


def as_dtensor_like(local: torch.Tensor, like):
    """Wrap the local shard ``local`` as a DTensor with ``like``'s mesh, placements and global shape.

    No communication. ``local`` keeps its own dtype/device; only its shape is checked.
    """
    if tuple(local.shape) != tuple(like._local_tensor.shape):
        raise ValueError(f"local shard has shape {tuple(local.shape)}, expected {tuple(like._local_tensor.shape)}")
    return _dtensor_api()[0].from_local(local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride())


def _ddp_types() -> tuple:
    ddp = getattr(getattr(nn, "parallel", None), "DistributedDataParallel", None)
    return (ddp,) if ddp is not None else ()


def data_parallel_groups(model: nn.Module) -> tuple:
    """Process groups whose ranks see different data: sum per-rank importance sums over them.

    * DDP wrapper (possibly under ``torch.compile``): DDP's process group.
    * Parameters that are DTensors (FSDP2 / HSDP): every dim of their device mesh.
    * Otherwise ``()``: a plain model computes the importance of its own data only, even
      when a process group exists (wrap the model in DDP to combine ranks).
    """
    m = model
    while True:
        if isinstance(m, _ddp_types()):
            return (m.process_group,)
        inner = getattr(m, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            break
        m = inner
    meshes = []
    for p in model.parameters():
        if is_dtensor(p):
            _placements(p)
            if not any(p.device_mesh is m_ or p.device_mesh == m_ for m_ in meshes):
                meshes.append(p.device_mesh)
    if not meshes:
        return ()
    if len(meshes) > 1:
        raise NotImplementedError("parameters on several device meshes; fastcl supports one FSDP mesh per model")
    mesh = meshes[0]
    return tuple(mesh.get_group(i) for i in range(mesh.ndim))


def memory_estimate(
    model: nn.Module,
    storage_dtype: torch.dtype = torch.float32,
    world_size: int | None = None,
    *,
    importance: bool = True,
) -> int:
    r"""Bytes per rank of a regularizer's stored state (anchors + importance) for ``model``.

    ``Σ_k numel_k · itemsize · (2 if importance else 1)`` over the trainable parameters,
    where ``itemsize`` is that of ``storage_dtype`` (float64 parameters are stored in
    float64) and ``numel_k`` is the number of elements a rank stores:

    * ``world_size=None``: what this rank holds now — the local shard of a DTensor (FSDP2)
      parameter, the whole tensor otherwise (DDP / single process);
    * ``world_size=W``: the largest FSDP-style shard, ``ceil(d₀/W)·(numel/d₀)`` (dim 0
      split in ``W`` chunks), as if every parameter were sharded over ``W`` ranks.

    ``importance=False`` counts anchors only (L2-SP / L1-SP). SI's running path integral
    and start point are not included. Not included either: the transient float32 (float64)
    accumulators of the importance pass, one full-size tensor per parameter while it runs.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if storage_dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"storage_dtype must be torch.float32 or torch.bfloat16, got {storage_dtype}")
    if world_size is not None and (isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1):
        raise ValueError(f"world_size must be a positive int or None, got {world_size!r}")
    total = 0
    seen = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        itemsize = 8 if p.dtype == torch.float64 else torch.empty((), dtype=storage_dtype).element_size()
        if world_size is None:
            numel = local_tensor(p.detach()).numel() if is_dtensor(p) else p.numel()
        elif p.dim() == 0 or p.numel() == 0:
            numel = p.numel()
        else:
            d0 = p.shape[0]
            numel = math.ceil(d0 / world_size) * (p.numel() // d0)
        total += numel * itemsize * (2 if importance else 1)
    return total
