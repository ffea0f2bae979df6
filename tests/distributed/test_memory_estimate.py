"""fastcl.distributed.memory_estimate on plain models (no process group needed)."""
import math

import pytest
import torch

from fastcl.distributed import memory_estimate


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(13, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3, bias=False)).to(dtype)
    m[0].bias.requires_grad_(False)  # frozen: not covered, not counted
    return m


def _trainable_shapes(m):
    return [tuple(p.shape) for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("storage_dtype,itemsize", [(torch.float32, 4), (torch.bfloat16, 2)])
@pytest.mark.parametrize("importance,tensors", [(True, 2), (False, 1)])
def test_replicated(storage_dtype, itemsize, importance, tensors):
    m = _model()
    numel = sum(math.prod(s) for s in _trainable_shapes(m))
    assert memory_estimate(m, storage_dtype, importance=importance) == numel * itemsize * tensors


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_sharded_over_world_size(world_size):
    m = _model()
    expected = sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in _trainable_shapes(m)) * 4 * 2
    assert memory_estimate(m, world_size=world_size) == expected


def test_float64_parameters_are_stored_in_float64():
    m = _model(torch.float64)
    numel = sum(math.prod(s) for s in _trainable_shapes(m))
    assert memory_estimate(m, torch.bfloat16) == numel * 8 * 2


def test_tied_parameters_count_once():
    m = _model()
    m[2].weight = torch.nn.Parameter(torch.randn(3, 5))
    m.append(torch.nn.Linear(5, 3, bias=False))
    m[3].weight = m[2].weight
    assert memory_estimate(m) == (13 * 5 + 3 * 5) * 4 * 2


@pytest.mark.parametrize(
    "kwargs,error",
    [({"storage_dtype": torch.float16}, TypeError), ({"world_size": 0}, ValueError), ({"world_size": True}, ValueError)],
)
def test_bad_arguments(kwargs, error):
    with pytest.raises(error):
        memory_estimate(_model(), **kwargs)
    with pytest.raises(TypeError):
        memory_estimate("not a model")
