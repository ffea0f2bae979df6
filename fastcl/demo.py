"""Continual learning on scikit-learn's bundled digits: every strategy, same seeds, one table.

Scenarios (5 tasks each, test accuracy on every task after every task goes into an
:class:`~fastcl.metrics.AccuracyMatrix`):

* ``permuted-digits`` (domain-incremental): task ``t`` is all ten digits with the 64
  pixels reordered by a fixed permutation (task 0: the identity); one 10-way head.
* ``split-digits`` (task-incremental): task ``t`` is the digits ``{2t, 2t+1}``; loss and
  prediction use only the logits of the current task's two classes (a multi-head
  network as column masks of one 10-way head).

Strategies: ``finetune`` (plain sequential training), ``freeze`` (after task 0 only the
last layer trains), ``l2sp``, ``ewc``, ``online-ewc``, ``si``, ``mas``, ``lwf``, and with
experience replay ``replay`` (fine-tuning + replay), ``ewc+replay``, ``lwf+replay``. Every
strategy starts from the same initial weights; those without replay see the same
mini-batches. Replay keeps a :class:`~fastcl.ReplayBuffer` of ``replay_capacity``
samples (reservoir over every task seen so far) and trains on batches of 32 new plus 8
replayed samples (``replay_fraction`` 0.2 of 40); on split-digits a replayed sample is
scored on its own task's head.
The model is an MLP ``64 → h → h → 10`` (ReLU) trained with SGD (momentum 0.9); one
optimizer lives through all tasks. Weight-space penalties add their gradient with the
fused ``add_penalty_grad_`` after ``backward()``; LwF adds its distillation loss.

Defaults (:class:`DemoConfig`): 3 epochs per task, batch 32, lr 0.05, h = 128, EWC with
the exact Fisher (expectation over the classes) and λ = 30 (online EWC: λ = 30, γ = 0.9),
L2-SP λ = 0.1, SI λ = 3 (ξ = 0.1), MAS λ = 0.03, LwF λ = 1 at T = 2, replay memory of
200 samples. They come from a small sweep on seed 0 (λ over a decade either side);
every strategy got the same budget. :func:`run_sweep` (``fastcl demo --sweep-strength``)
trains each regularizer over a grid of strengths. Much larger λ with this learning rate
makes SGD diverge on the stiff quadratic (the run then stops with a clear error; a
sweep records it as diverged).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._validate import check_int, check_real
from .finetune import default_blocks, freeze, unfreeze
from .metrics import AccuracyMatrix
from .scenarios import Task, load_digits, permuted, split

__all__ = [
    "REGULARIZERS", "SCENARIOS", "STRATEGIES", "DemoConfig", "build_tasks", "format_sweep", "format_table", "run_demo",
    "run_sweep", "save_plot", "save_sweep_plot",
]

SCENARIOS = ("permuted-digits", "split-digits")
STRATEGIES = ("finetune", "freeze", "l2sp", "ewc", "online-ewc", "si", "mas", "lwf", "replay", "ewc+replay", "lwf+replay")
REGULARIZERS = ("l2sp", "ewc", "online-ewc", "si", "mas", "lwf")
"""The strategies with a strength λ (a ``+replay`` variant uses its base strategy's λ)."""
CHANCE = {"permuted-digits": 0.1, "split-digits": 0.5}
"""Accuracy of guessing: 10 classes on permuted digits, a 2-way head per task on split digits."""
SWEEP_FACTORS = (0.01, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)
"""Default sweep grid: multiples of each regularizer's default strength."""


def _default_strengths() -> dict[str, float]:
    return {
        "l2sp": 0.1,
        "ewc": 30.0,
        "online-ewc": 30.0,
        "si": 3.0,
        "mas": 0.03,
        "lwf": 1.0,
    }


@dataclass
class DemoConfig:
    """Hyperparameters of the demo (the defaults are the ones the CLI uses).

    ``strengths`` maps a strategy to its λ; ``online_decay`` is online EWC's γ;
    ``lwf_temperature`` is LwF's T; ``fisher`` the EWC Fisher estimator.
    """

    epochs: int = 3
    hidden: int = 128
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    batch_size: int = 32
    seed: int = 0
    device: str = "cpu"
    num_tasks: int = 5
    strengths: dict[str, float] = field(default_factory=_default_strengths)
    online_decay: float = 0.9
    lwf_temperature: float = 2.0
    fisher: str = "exact"
    consolidate_batch_size: int = 256
    replay_capacity: int = 200
    replay_fraction: float = 0.2

    def validate(self) -> None:
        """Check every field; NumPy and 0-dim tensor scalars become Python numbers (in place).

        Raises TypeError (not a number, a bool) or ValueError (out of range), naming the field.
        """
        for name in ("epochs", "hidden", "batch_size", "num_tasks", "consolidate_batch_size", "replay_capacity"):
            setattr(self, name, check_int(getattr(self, name), name, low=1))
        self.seed = check_int(self.seed, "seed", low=0, high=2**63 - 1)
        if self.num_tasks > 5:
            raise ValueError(f"num_tasks must be at most 5 (split-digits has 5 pairs of classes), got {self.num_tasks}")
        self.lr = check_real(self.lr, "lr", low=0.0, low_inclusive=False)
        self.momentum = check_real(self.momentum, "momentum", low=0.0, high=1.0, high_inclusive=False)
        self.online_decay = check_real(self.online_decay, "online_decay", low=0.0, high=1.0)
        self.lwf_temperature = check_real(self.lwf_temperature, "lwf_temperature", low=0.0, low_inclusive=False)
        self.replay_fraction = check_real(self.replay_fraction, "replay_fraction", low=0.0, high=1.0, high_inclusive=False)
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        from .strategies.ewc import FISHER_KINDS

        if self.fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {self.fisher!r}")
        self.device = str(_check_device(self.device))
        if not isinstance(self.strengths, Mapping):
            raise TypeError(f"strengths must be a mapping {{strategy: strength}}, got {type(self.strengths).__name__}")
        strengths = {}
        for name, value in self.strengths.items():
            if name not in REGULARIZERS:
                raise ValueError(f"strengths: {name!r} has no strength; the strategies with one are {', '.join(REGULARIZERS)}")
            strengths[name] = check_real(value, f"strengths[{name!r}]", low=0.0)
        self.strengths = {**self.strengths, **strengths}


def _check_device(device) -> torch.device:
    """``device`` as a ``torch.device`` that exists on this machine (ValueError naming it otherwise)."""
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string or torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device {device!r} is not a torch device: {exc}") from None
    if dev.type != "cpu":
        backend = getattr(torch, dev.type, None)
        available = getattr(backend, "is_available", None)
        if available is not None and not available():
            raise ValueError(f"device {device!r}: torch.{dev.type} is not available on this machine")
    return dev


# ---------------------------------------------------------------------------- data
@dataclass
class _TaskData:
    """One task on the target device, with the columns of its head (``None``: all 10)."""

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    columns: torch.Tensor | None


def _choices(values, name: str, allowed: Sequence[str], why: str = "") -> list[str]:
    """``values``, a non-empty sequence of names from ``allowed`` (a bare string is refused, not split into letters)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a list of names from {', '.join(allowed)}, got {values!r}")
    if not values:
        raise ValueError(f"{name} is empty; choose from {', '.join(allowed)}")
    bad = [v for v in values if v not in allowed]
    if bad:
        raise ValueError(f"{name}: unknown {', '.join(map(repr, bad))}; expected names from {', '.join(allowed)}{why}")
    return list(values)


def _config(config) -> DemoConfig:
    """``config`` (default: :class:`DemoConfig`) after :meth:`DemoConfig.validate`."""
    if config is None:
        config = DemoConfig()
    if not isinstance(config, DemoConfig):
        raise TypeError(f"config must be a DemoConfig or None, got {type(config).__name__}")
    config.validate()
    return config


def build_tasks(scenario: str, num_tasks: int = 5, seed: int = 0, device: str | torch.device = "cpu") -> list[_TaskData]:
    """The tasks of ``scenario`` on ``device``; the data split and permutations follow ``seed``.

    ``num_tasks``: 1..5 for split-digits (five pairs of digits), at least 1 for permuted-digits.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; expected one of {', '.join(SCENARIOS)}")
    num_tasks = check_int(num_tasks, "num_tasks", low=1, high=5 if scenario == "split-digits" else None)
    train, test = load_digits(test_fraction=0.25, seed=seed)
    if scenario == "permuted-digits":
        tasks: list[Task] = permuted(train, num_tasks, test=test, seed=seed)
    else:
        tasks = split(train, 2, test=test)[:num_tasks]
    out = []
    for task in tasks:
        x, y = task.train.tensors
        xt, yt = task.test.tensors
        cols = None if scenario == "permuted-digits" else torch.tensor(task.classes, device=device)
        out.append(_TaskData(x.to(device), y.to(device), xt.to(device), yt.to(device), cols))
    return out


def _label_heads(tasks: Sequence[_TaskData]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Split scenarios: ``(head[label] = its task's columns, index[label] = its position there)``; else None."""
    if tasks[0].columns is None:
        return None
    classes = torch.cat([t.columns for t in tasks])
    head = torch.zeros(int(classes.max()) + 1, tasks[0].columns.numel(), dtype=torch.long, device=classes.device)
    index = torch.zeros(head.shape[0], dtype=torch.long, device=classes.device)
    for t in tasks:
        head[t.columns] = t.columns
        index[t.columns] = torch.arange(t.columns.numel(), device=classes.device)
    return head, index


def _restrict_per_sample(logits: torch.Tensor, targets: torch.Tensor, heads) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sample's logits on its own task's head (replayed samples come from other tasks)."""
    if heads is None:
        return logits, targets
    head, index = heads
    return logits.gather(1, head[targets]), index[targets]


def _restrict(logits: torch.Tensor, targets: torch.Tensor, columns: torch.Tensor | None):
    """Logits and targets restricted to a task's head: the task's columns, targets re-indexed."""
    if columns is None:
        return logits, targets
    remapped = (targets.unsqueeze(1) == columns.unsqueeze(0)).long().argmax(dim=1)
    return logits.index_select(1, columns), remapped


def _task_forward(columns: torch.Tensor | None):
    """``forward(model, batch) -> (outputs, targets)`` for the importance engines: the task's head only."""
    if columns is None:
        return None

    def forward(model: nn.Module, batch):
        inputs, targets = batch
        return _restrict(model(inputs), targets, columns)

    return forward


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


@torch.no_grad()
def _accuracy(model: nn.Module, task: _TaskData) -> float:
    logits, targets = _restrict(model(task.x_test), task.y_test, task.columns)
    return float((logits.argmax(dim=1) == targets).float().mean())


def _mlp(hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


# ---------------------------------------------------------------------------- strategies
def _strategies():
    """``fastcl.strategies``, imported on first use (finetune/freeze do not need it)."""
    from . import strategies

    return strategies


class _Strategy:
    """How one strategy hooks into the shared training loop."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: DemoConfig):
        self.model, self.optimizer, self.cfg = model, optimizer, cfg

    def extra_loss(self, inputs: torch.Tensor, logits: torch.Tensor, task: int, tasks: Sequence[_TaskData]):
        """A differentiable term added to the task loss (``None``: nothing)."""
        return None

    def after_backward(self) -> None:
        """Called between ``loss.backward()`` and ``optimizer.step()``."""

    def end_task(self, task: int, tasks: Sequence[_TaskData]) -> None:
        """Called once the training of ``task`` is over."""


class _Finetune(_Strategy):
    pass


class _FreezeBody(_Strategy):
    def end_task(self, task, tasks):
        if task == 0:
            freeze(self.model)
            unfreeze(self.model, default_blocks(self.model)[-1] + ".*")


class _Anchored(_Strategy):
    """A weight-space regularizer whose gradient goes straight into ``.grad`` (fused path)."""

    reg = None

    def after_backward(self):
        if self.reg is not None:
            self.reg.add_penalty_grad_()


class _L2SP(_Anchored):
    def end_task(self, task, tasks):
        if self.reg is None:  # anchors = the weights after task 0
            self.reg = _strategies().L2SP(self.model, self.cfg.strengths["l2sp"])
        else:
            self.reg.consolidate()


class _ImportanceOnData(_Anchored):
    """EWC and MAS: consolidate on the finished task's training data, scored on its own head."""

    def end_task(self, task, tasks):
        t = tasks[task]
        self.reg.consolidate(_batches(t.x, t.y, self.cfg.consolidate_batch_size), forward=_task_forward(t.columns), verbose=False)


class _EWC(_ImportanceOnData):
    def __init__(self, model, optimizer, cfg, online: bool = False):
        super().__init__(model, optimizer, cfg)
        if online:
            self.reg = _strategies().EWC(model, cfg.strengths["online-ewc"], mode="online", decay=cfg.online_decay, fisher=cfg.fisher)
        else:
            self.reg = _strategies().EWC(model, cfg.strengths["ewc"], mode="separate", fisher=cfg.fisher)


class _SI(_Anchored):
    def __init__(self, model, optimizer, cfg):
        super().__init__(model, optimizer, cfg)
        self.reg = _strategies().SI(model, cfg.strengths["si"])
        self.reg.attach(optimizer)

    def end_task(self, task, tasks):
        self.reg.consolidate()


class _MAS(_ImportanceOnData):
    def __init__(self, model, optimizer, cfg):
        super().__init__(model, optimizer, cfg)
        self.reg = _strategies().MAS(model, cfg.strengths["mas"])


class _LwF(_Strategy):
    def __init__(self, model, optimizer, cfg):
        super().__init__(model, optimizer, cfg)
        self.reg = _strategies().LwF(model, strength=cfg.strengths["lwf"], temperature=cfg.lwf_temperature)

    def extra_loss(self, inputs, logits, task, tasks):
        if not self.reg.consolidated:
            return None
        old = None
        if tasks[0].columns is not None:
            old = torch.cat([tasks[j].columns for j in range(task)])
        return self.reg.penalty(inputs, logits, old_classes=old)

    def end_task(self, task, tasks):
        self.reg.consolidate()


_FACTORIES: dict[str, Callable[..., _Strategy]] = {
    "finetune": _Finetune,
    "freeze": _FreezeBody,
    "l2sp": _L2SP,
    "ewc": _EWC,
    "online-ewc": lambda m, o, c: _EWC(m, o, c, online=True),
    "si": _SI,
    "mas": _MAS,
    "lwf": _LwF,
}


def _base_strategy(strategy: str) -> str:
    """``ewc+replay`` -> ``ewc``; ``replay`` -> ``finetune``."""
    if strategy == "replay":
        return "finetune"
    return strategy.removesuffix("+replay")


def _uses_replay(strategy: str) -> bool:
    return strategy == "replay" or strategy.endswith("+replay")


class Diverged(FloatingPointError):
    """A training run reached a non-finite loss (too large a strength or learning rate)."""


# ---------------------------------------------------------------------------- loop
def train_strategy(
    strategy: str, tasks: Sequence[_TaskData], cfg: DemoConfig, on_task_done: Callable[[int], None] | None = None
) -> AccuracyMatrix:
    """Train ``strategy`` on ``tasks`` in order; return the filled accuracy matrix.

    ``on_task_done(t)`` is called after task ``t`` is trained and evaluated (progress).
    The initial weights come from ``torch.manual_seed(cfg.seed)`` inside
    :func:`torch.random.fork_rng`, so the caller's global RNG state is left as it was.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    device = torch.device(cfg.device)
    cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(cfg.seed)
        return _train(strategy, tasks, cfg, device, on_task_done)


def _train(strategy, tasks, cfg, device, on_task_done) -> AccuracyMatrix:
    model = _mlp(cfg.hidden).to(device)
    if cfg.optimizer == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    hooks = _FACTORIES[_base_strategy(strategy)](model, optimizer, cfg)
    buffer = None
    if _uses_replay(strategy):
        from .replay import ReplayBuffer

        buffer = ReplayBuffer(cfg.replay_capacity, seed=cfg.seed)
    heads = _label_heads(tasks)
    matrix = AccuracyMatrix(len(tasks))
    for t in range(len(tasks)):
        task = tasks[t]
        model.train()
        for epoch in range(cfg.epochs):
            seed = cfg.seed * 10007 + t * 101 + epoch
            for inputs, targets in _epoch_batches(task, buffer, cfg, seed, device):
                logits = model(inputs)
                if buffer is None:
                    loss = F.cross_entropy(*_restrict(logits, targets, task.columns))
                else:
                    loss = F.cross_entropy(*_restrict_per_sample(logits, targets, heads))
                extra = hooks.extra_loss(inputs, logits, t, tasks)
                if extra is not None:
                    loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                hooks.after_backward()
                optimizer.step()
            if not math.isfinite(float(loss.detach())):  # once per epoch: no per-step device sync
                raise _diverged(strategy, t, cfg)
        model.eval()
        if not _trained_model_is_finite(model, task):  # before consolidating on it: that would fail less clearly
            raise _diverged(strategy, t, cfg)
        hooks.end_task(t, tasks)
        if buffer is not None:
            buffer.add(task.x, task.y)
        for j, other in enumerate(tasks):
            matrix.record(t, j, _accuracy(model, other))
        if on_task_done is not None:
            on_task_done(t)
    return matrix


def _diverged(strategy: str, task: int, cfg: DemoConfig) -> Diverged:
    strength = cfg.strengths.get(_base_strategy(strategy))
    with_strength = "" if strength is None else f" at strength {strength:g}"
    return Diverged(
        f"{strategy} diverged on task {task}{with_strength} (non-finite loss or weights); lower its strength or the "
        "learning rate (README: Choosing strength)"
    )


@torch.no_grad()
def _trained_model_is_finite(model: nn.Module, task: _TaskData) -> bool:
    """Finite weights and finite log-probabilities of every class on every training sample of the task."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return False
    logits, _ = _restrict(model(task.x), task.y, task.columns)
    return bool(torch.isfinite(F.log_softmax(logits.double(), dim=1)).all())


def _epoch_batches(task: _TaskData, buffer, cfg: DemoConfig, seed: int, device: torch.device):
    """One epoch of ``(inputs, targets)`` on ``device``: the task's data in a seeded order, plus replay."""
    n = task.x.shape[0]
    if buffer is None:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(device)
        for start in range(0, n, cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            yield task.x[idx], task.y[idx]
        return
    from torch.utils.data import TensorDataset

    # cfg.batch_size new samples per step, as without replay, plus the replayed share on top
    total = round(cfg.batch_size / (1.0 - cfg.replay_fraction))
    loader = buffer.mixed_loader(TensorDataset(task.x.cpu(), task.y.cpu()), batch_size=total,
                                 replay_fraction=(total - cfg.batch_size) / total,
                                 generator=torch.Generator().manual_seed(seed))
    for inputs, targets in loader:
        yield inputs.to(device), targets.to(device)


def _warm_up() -> None:
    """Pay torch's one-time costs (the first optimizer imports torch._dynamo) before any timing."""
    p = torch.zeros(1, requires_grad=True)
    torch.optim.SGD([p], lr=0.1).step()
    torch.optim.Adam([p], lr=0.1).step()


def run_demo(
    scenarios: Sequence[str] = SCENARIOS,
    strategies: Sequence[str] = STRATEGIES,
    config: DemoConfig | None = None,
    progress: bool | None = False,
) -> dict[str, dict[str, dict]]:
    """Run every strategy on every scenario.

    ``progress``: a tqdm bar per scenario on stderr (``True``), none (``False``), or one only
    when stderr is a terminal (``None``).

    Returns ``{scenario: {strategy: {"average_accuracy", "forgetting", "backward_transfer",
    "seconds", "accuracy_matrix"}}}`` (metrics after the last task, accuracies in [0, 1]).
    """
    cfg = _config(config)
    scenarios = _choices(scenarios, "scenarios", SCENARIOS)
    strategies = _choices(strategies, "strategies", STRATEGIES)
    _warm_up()
    results: dict[str, dict[str, dict]] = {}
    for scenario in scenarios:
        tasks = build_tasks(scenario, cfg.num_tasks, cfg.seed, cfg.device)
        results[scenario] = {}
        bar = None
        if progress is not False:
            from tqdm.auto import tqdm

            # progress=None: only when stderr is a terminal (tqdm's disable=None)
            bar = tqdm(total=len(strategies) * len(tasks), desc=scenario, unit="task", file=sys.stderr,
                       leave=False, dynamic_ncols=True, disable=None if progress is None else False)
        for strategy in strategies:
            if bar is not None:
                bar.set_postfix_str(strategy)
            start = time.perf_counter()
            matrix = train_strategy(strategy, tasks, cfg, None if bar is None else (lambda t: bar.update(1)))
            seconds = time.perf_counter() - start
            summary = matrix.to_dict()
            results[scenario][strategy] = {
                "average_accuracy": summary["average_accuracy"],
                "forgetting": summary["forgetting"],
                "backward_transfer": summary["backward_transfer"],
                "seconds": seconds,
                "accuracy_matrix": summary["accuracy_matrix"],
            }
        if bar is not None:
            bar.close()
    return results


def _pct(value) -> str:
    return "    n/a" if value is None else f"{100 * value:7.1f}"


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """A plain-text table per scenario: strategy, average accuracy, forgetting, BWT (in %), seconds."""
    lines = []
    for scenario, by_strategy in results.items():
        lines.append(f"{scenario}")
        lines.append(f"  {'strategy':<11} {'avg acc %':>9} {'forget %':>9} {'BWT %':>9} {'seconds':>8}")
        for strategy, r in by_strategy.items():
            lines.append(
                f"  {strategy:<11} {_pct(r['average_accuracy']):>9} {_pct(r['forgetting']):>9} "
                f"{_pct(r['backward_transfer']):>9} {r['seconds']:8.2f}"
            )
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def _styles(n: int) -> list[dict]:
    """``n`` line styles that stay distinguishable: colour, dash pattern and marker all cycle."""
    colors = [f"C{i}" for i in range(10)]
    dashes = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]
    return [{"color": colors[i % 10], "linestyle": dashes[i % 4], "marker": markers[i % len(markers)]} for i in range(n)]


def save_plot(results: dict[str, dict[str, dict]], path: str) -> None:
    """Average accuracy over the tasks seen so far, after each task, per strategy (needs matplotlib).

    Both panels share one y-range (0-100 %) and show the scenario's chance level.
    """
    if not isinstance(results, Mapping) or not results:
        raise ValueError(f"results must be the non-empty mapping run_demo() returns, got {results!r}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False, sharey=True)
    names = list(dict.fromkeys(s for by in results.values() for s in by))
    style = dict(zip(names, _styles(len(names))))
    for ax, (scenario, by_strategy) in zip(axes[0], results.items()):
        steps = 1
        for strategy, r in by_strategy.items():
            m = np.array([[np.nan if v is None else v for v in row] for row in r["accuracy_matrix"]])
            curve = [np.nanmean(m[i, : i + 1]) * 100 for i in range(m.shape[0])]
            steps = len(curve)
            ax.plot(range(1, steps + 1), curve, label=strategy, markersize=5, linewidth=1.4, **style[strategy])
        if scenario in CHANCE:
            ax.axhline(100 * CHANCE[scenario], color="0.4", linewidth=1, linestyle=(0, (1, 3)), label="chance")
        ax.set_title(scenario)
        ax.set_xlabel("tasks trained")
        ax.set_xticks(range(1, steps + 1))
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("average accuracy on seen tasks (%)")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------- strength sweep
def run_sweep(
    scenarios: Sequence[str] = SCENARIOS,
    strategies: Sequence[str] = REGULARIZERS,
    config: DemoConfig | None = None,
    factors: Sequence[float] = SWEEP_FACTORS,
    progress: bool | None = False,
) -> dict[str, dict]:
    """Train each regularizer at ``strength = default · factor`` for every factor, plus fine-tuning.

    Returns ``{scenario: {"finetune": metrics, strategy: [{"strength", "diverged",
    "average_accuracy", "forgetting", "backward_transfer", "seconds"}, ...]}}``; a run that
    diverges (non-finite loss) is recorded with ``diverged=True`` and ``None`` metrics.
    """
    cfg = _config(config)
    scenarios = _choices(scenarios, "scenarios", SCENARIOS)
    strategies = _choices(strategies, "strategies", REGULARIZERS, why=" (run_sweep needs strategies with a strength)")
    if isinstance(factors, (str, bytes)) or not isinstance(factors, Sequence) or not factors:
        raise TypeError(f"factors must be a non-empty sequence of positive numbers, got {factors!r}")
    factors = [check_real(f, "factors entry", low=0.0, low_inclusive=False) for f in factors]
    _warm_up()
    out: dict[str, dict] = {}
    for scenario in scenarios:
        tasks = build_tasks(scenario, cfg.num_tasks, cfg.seed, cfg.device)
        bar = None
        if progress is not False:
            from tqdm.auto import tqdm

            bar = tqdm(total=1 + len(strategies) * len(factors), desc=f"sweep {scenario}", unit="run", file=sys.stderr,
                       leave=False, dynamic_ncols=True, disable=None if progress is None else False)
        out[scenario] = {"finetune": _summary(train_strategy("finetune", tasks, cfg), 0.0)}
        if bar is not None:
            bar.update(1)
        for strategy in strategies:
            rows = []
            for factor in factors:
                strength = _default_strengths()[strategy] * factor
                run_cfg = dataclasses.replace(cfg, strengths={**cfg.strengths, strategy: strength})
                start = time.perf_counter()
                try:
                    row = {"strength": strength, "diverged": False, **_summary(train_strategy(strategy, tasks, run_cfg), 0.0)}
                except Diverged:
                    row = {"strength": strength, "diverged": True, "average_accuracy": None, "forgetting": None,
                           "backward_transfer": None}
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
                if bar is not None:
                    bar.set_postfix_str(f"{strategy} λ={strength:g}")
                    bar.update(1)
            out[scenario][strategy] = rows
        if bar is not None:
            bar.close()
    return out


def _summary(matrix: AccuracyMatrix, seconds: float) -> dict:
    d = matrix.to_dict()
    return {k: d[k] for k in ("average_accuracy", "forgetting", "backward_transfer")} | {"seconds": seconds}


def format_sweep(sweep: dict[str, dict]) -> str:
    """One table per scenario: strategy, strength, average accuracy, forgetting, BWT (in %)."""
    lines = []
    for scenario, by_strategy in sweep.items():
        lines.append(f"{scenario}: final metrics by strength (higher avg acc, lower forgetting is better)")
        lines.append(f"  {'strategy':<11} {'strength':>9} {'avg acc %':>9} {'forget %':>9} {'BWT %':>9}")
        base = by_strategy["finetune"]
        lines.append(f"  {'finetune':<11} {'-':>9} {_pct(base['average_accuracy']):>9} {_pct(base['forgetting']):>9} "
                     f"{_pct(base['backward_transfer']):>9}")
        for strategy, rows in by_strategy.items():
            if strategy == "finetune":
                continue
            for r in rows:
                if r["diverged"]:
                    lines.append(f"  {strategy:<11} {r['strength']:>9.3g}  diverged (non-finite loss)")
                else:
                    lines.append(f"  {strategy:<11} {r['strength']:>9.3g} {_pct(r['average_accuracy']):>9} "
                                 f"{_pct(r['forgetting']):>9} {_pct(r['backward_transfer']):>9}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")


def save_sweep_plot(sweep: dict[str, dict], path: str) -> None:
    """Final average accuracy and forgetting against strength (log scale), one row per scenario.

    Dashed grey: fine-tuning (no regularizer); dotted: chance; ``x`` at the bottom: diverged runs.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(sweep), 2, figsize=(11, 3.8 * len(sweep)), squeeze=False)
    names = list(dict.fromkeys(s for by in sweep.values() for s in by if s != "finetune"))
    style = dict(zip(names, _styles(len(names))))
    for row, (scenario, by_strategy) in zip(axes, sweep.items()):
        base = by_strategy["finetune"]
        for ax, key, label in ((row[0], "average_accuracy", "final average accuracy (%)"), (row[1], "forgetting", "forgetting (%)")):
            for k, strategy in enumerate(names):
                rows = by_strategy.get(strategy, [])
                ok = [r for r in rows if not r["diverged"]]
                ax.plot([r["strength"] for r in ok], [100 * r[key] for r in ok], label=strategy, markersize=5, linewidth=1.4,
                        **style[strategy])
                bad = [r["strength"] for r in rows if r["diverged"]]
                if bad:
                    # one row of crosses per strategy, so coinciding divergences stay visible
                    ax.plot(bad, [2.0 + 2.5 * k] * len(bad), linestyle="none", marker="x", color=style[strategy]["color"],
                            markersize=7)
            ax.axhline(100 * base[key], color="0.45", linestyle="--", linewidth=1, label="finetune (λ = 0)")
            if key == "average_accuracy" and scenario in CHANCE:
                ax.axhline(100 * CHANCE[scenario], color="0.4", linestyle=(0, (1, 3)), linewidth=1, label="chance")
            ax.set_xscale("log")
            ax.set_ylim(0, 100)
            ax.set_xlabel("strength λ (log scale; x at the bottom: diverged)")
            ax.set_ylabel(label)
            ax.set_title(f"{scenario}: {'accuracy (higher is better)' if key == 'average_accuracy' else 'forgetting (lower is better)'}",
                         fontsize=10)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


# ---------------------------------------------------------------------------- run record
def run_record(config: DemoConfig, scenarios: Sequence[str], strategies: Sequence[str], **extra) -> dict:
    """What produced a result: the configuration, the versions and the backends (for ``--json``)."""
    import platform

    from ._version import __version__
    from .ops import backend_info

    try:
        backends = backend_info(config.device)
    except Exception as exc:  # noqa: BLE001 - a record must not fail the run it describes
        backends = {"error": str(exc)}
    return {
        "config": {"scenarios": list(scenarios), "strategies": list(strategies), **dataclasses.asdict(config), **extra},
        "environment": {
            "fastcl": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "threads": torch.get_num_threads(),
            "backends": backends,
        },
    }


def config_with(**overrides) -> DemoConfig:
    """``DemoConfig`` with some fields replaced (``None`` values are ignored)."""
    return dataclasses.replace(DemoConfig(), **{k: v for k, v in overrides.items() if v is not None})
