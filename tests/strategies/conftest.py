import pytest
import torch


def make_mlp(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).to(dtype)


def perturb_(model, scale=0.3, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def snapshot(model):
    return {n: p.detach().clone().double() for n, p in model.named_parameters()}


@pytest.fixture
def mlp():
    return make_mlp()
