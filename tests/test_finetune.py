"""Freezing, layer-wise learning rates and gradual unfreezing."""
import numpy as np
import pytest
import torch
from torch import nn

from fastcl.finetune import GradualUnfreezer, default_blocks, freeze, layerwise_lr_groups, trainable_parameters, unfreeze


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 5))
        self.scale = nn.Parameter(torch.ones(1))
        self.head = nn.Linear(5, 3)

    def forward(self, idx):
        return self.head(self.encoder(self.embed(idx)) * self.scale)


def _ids(params):
    return [id(p) for p in params]


def _flags(model):
    return {n: p.requires_grad for n, p in model.named_parameters()}


def test_freeze_all_and_unfreeze_all():
    net = _Net()
    names = [n for n, _ in net.named_parameters()]
    assert freeze(net) == names
    assert not any(_flags(net).values()) and trainable_parameters(net) == []
    assert freeze(net) == []  # nothing changes the second time
    assert unfreeze(net) == names
    assert _ids(trainable_parameters(net)) == _ids(net.parameters())


def test_patterns_select_by_qualified_name():
    net = _Net()
    changed = freeze(net, ["encoder.*", "embed.weight"])
    assert changed == ["embed.weight", "encoder.0.weight", "encoder.0.bias", "encoder.1.weight", "encoder.1.bias", "encoder.2.weight", "encoder.2.bias"]
    assert _flags(net)["head.weight"] and _flags(net)["scale"]
    assert unfreeze(net, "encoder.?.bias") == ["encoder.0.bias", "encoder.1.bias", "encoder.2.bias"]
    assert _ids(trainable_parameters(net)) == _ids([net.scale, net.encoder[0].bias, net.encoder[1].bias, net.encoder[2].bias, net.head.weight, net.head.bias])


def test_frozen_parameters_get_no_gradient():
    net = _Net()
    freeze(net, "encoder.*")
    net(torch.tensor([1, 2, 3])).sum().backward()
    assert all(p.grad is None for p in net.encoder.parameters())
    assert net.head.weight.grad is not None and net.embed.weight.grad is not None


def test_unmatched_pattern_raises_and_changes_nothing():
    net = _Net()
    with pytest.raises(ValueError, match="encodr"):
        freeze(net, ["head.*", "encodr.*"])
    assert all(_flags(net).values())


@pytest.mark.parametrize("fn", [freeze, unfreeze, trainable_parameters, default_blocks])
def test_non_module_is_type_error(fn):
    with pytest.raises(TypeError, match="nn.Module"):
        fn([nn.Parameter(torch.zeros(1))])


def test_pattern_type_checked():
    with pytest.raises(TypeError, match="patterns"):
        freeze(_Net(), [1])


def test_default_blocks():
    # parameters registered on the model itself come first, as in named_parameters()
    assert default_blocks(_Net()) == ["scale", "embed", "encoder", "head"]
    assert default_blocks(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))) == ["0", "2"]


@pytest.mark.parametrize("decay", [0.5, 0.9, 1.0])
def test_layerwise_lr_default_blocks(decay):
    net = _Net()
    groups = layerwise_lr_groups(net, 0.1, decay=decay, weight_decay=0.01)
    assert [g["name"] for g in groups] == ["scale", "embed", "encoder", "head"]
    for k, g in enumerate(groups):
        assert g["lr"] == pytest.approx(0.1 * decay ** (3 - k), rel=1e-12)
        assert g["weight_decay"] == 0.01
    assert _ids(p for g in groups for p in g["params"]) == _ids(net.parameters())
    opt = torch.optim.SGD(groups, lr=1.0)  # per-group lr wins over the default
    net(torch.tensor([0, 1])).sum().backward()
    before = net.embed.weight.detach().clone()
    grad = net.embed.weight.grad.clone()
    opt.step()
    torch.testing.assert_close(net.embed.weight.detach(), before - 0.1 * decay**2 * (grad + 0.01 * before))


def test_layerwise_lr_explicit_nested_prefixes_longest_wins():
    net = _Net()
    groups = layerwise_lr_groups(net, 1.0, decay=0.5, blocks=["scale", "embed", "encoder", "encoder.2", "head"])
    by_name = {g["name"]: g for g in groups}
    assert _ids(by_name["encoder.2"]["params"]) == _ids([net.encoder[2].weight, net.encoder[2].bias])
    assert len(by_name["encoder"]["params"]) == 4
    assert by_name["encoder"]["lr"] == 0.5**2 and by_name["encoder.2"]["lr"] == 0.5


def test_layerwise_lr_prefix_is_not_a_string_prefix():
    model = nn.ModuleDict({"layer1": nn.Linear(2, 2), "layer10": nn.Linear(2, 2)})
    groups = layerwise_lr_groups(model, 1.0, blocks=["layer1", "layer10"], decay=0.5)
    assert [len(g["params"]) for g in groups] == [2, 2]


def test_layerwise_lr_skips_frozen_and_errors():
    net = _Net()
    freeze(net, "embed.*")
    assert "embed" not in [g["name"] for g in layerwise_lr_groups(net, 0.1)]
    assert "embed" in [g["name"] for g in layerwise_lr_groups(net, 0.1, trainable_only=False)]
    with pytest.raises(ValueError, match="none of the blocks"):
        layerwise_lr_groups(net, 0.1, blocks=["encoder", "head"])
    with pytest.raises(ValueError, match="own no parameter"):
        layerwise_lr_groups(net, 0.1, blocks=["scale", "embed", "encoder", "head", "tail"])
    for bad in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="base_lr"):
            layerwise_lr_groups(net, bad)
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="decay"):
            layerwise_lr_groups(net, 0.1, decay=bad)


def test_gradual_unfreezer():
    net = _Net()
    unfreezer = GradualUnfreezer(net)
    assert _ids(trainable_parameters(net)) == _ids([net.head.weight, net.head.bias])
    assert unfreezer.trainable_blocks == ["head"] and not unfreezer.done
    assert unfreezer.step() == [n for n, _ in net.named_parameters() if n.startswith("encoder.")]
    assert unfreezer.trainable_blocks == ["encoder", "head"]
    assert unfreezer.step() == ["embed.weight"]
    assert _ids(trainable_parameters(net)) == _ids(p for n, p in net.named_parameters() if n != "scale")
    assert unfreezer.step() == ["scale"] and unfreezer.done
    assert unfreezer.step() == []
    assert all(_flags(net).values())


def test_gradual_unfreezer_explicit_blocks_leave_others_frozen():
    net = _Net()
    unfreezer = GradualUnfreezer(net, blocks=["encoder", "head"])
    assert unfreezer.outside == ["scale", "embed.weight"]
    unfreezer.step()
    assert unfreezer.done
    flags = _flags(net)
    assert not flags["embed.weight"] and not flags["scale"] and flags["encoder.0.weight"]
    assert "encoder" in repr(unfreezer)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"base_lr": True}, TypeError, "base_lr"), ({"base_lr": 1e39}, ValueError, "base_lr"), ({"base_lr": "0.1"}, TypeError, "base_lr"),
    ({"decay": True}, TypeError, "decay"), ({"decay": float("nan")}, ValueError, "decay"),
    ({"trainable_only": "no"}, TypeError, "trainable_only"), ({"lr": 1.0}, TypeError, "lr"), ({"params": []}, TypeError, "params"),
    ({"blocks": 5}, TypeError, "blocks"), ({"blocks": "head"}, TypeError, "blocks"), ({"blocks": []}, ValueError, "blocks"),
    ({"blocks": [0, 1]}, TypeError, "blocks"),
])
def test_layerwise_lr_arguments_named(kwargs, error, match):
    with pytest.raises(error, match=match):
        layerwise_lr_groups(_Net(), **{"base_lr": 0.1, **kwargs})


def test_layerwise_lr_numpy_and_tensor_scalars():
    want = [g["lr"] for g in layerwise_lr_groups(_Net(), 0.1, decay=0.5)]
    for base_lr, decay in ((np.float32(0.1), np.float64(0.5)), (torch.tensor(0.1, dtype=torch.float64), torch.tensor(0.5))):
        got = [g["lr"] for g in layerwise_lr_groups(_Net(), base_lr, decay=decay)]
        assert got == pytest.approx(want) and all(type(lr) is float for lr in got)


@pytest.mark.parametrize("patterns", [5, [5], b"embed.*", []])
def test_freeze_patterns_type_named_and_nothing_changes(patterns):
    net = _Net()
    with pytest.raises(TypeError, match="patterns"):
        freeze(net, patterns)
    assert all(p.requires_grad for p in net.parameters())
