"""attach(optimizer) against the other two penalty paths: one EWC epoch, interleaved, medians, 1 thread.

    OMP_NUM_THREADS=1 flock /work/bench.lock python benchmarks/attach_overhead.py

Rows: plain training, ``add_penalty_grad_()`` after ``backward()``, ``attach(optimizer)``
(the same fused pass in the step pre-hook) and ``penalty()`` in the loss; an MLP of 1.8M
parameters (6 tensors), 20 batches of 64, SGD. Then the host cost per step of a 100-tensor
model whose kernels do almost nothing (8x8 layers), where the hook's bookkeeping shows.
(A candidate for a mode of ``suites/e2e.py``.)
"""
import statistics
import time

import torch
import torch.nn.functional as F

import fastcl

ROUNDS = 15


def epoch_benchmark():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    batches = [(torch.randn(64, 784), torch.randint(0, 10, (64,))) for _ in range(20)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    ewc = fastcl.EWC(model, 100.0)
    ewc.fold({n: torch.rand_like(p) for n, p in model.named_parameters()})

    def epoch(mode):
        if mode == "attach":
            ewc.attach(opt)
        for x, y in batches:
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            if mode == "penalty()":
                loss = loss + ewc.penalty()
            loss.backward()
            if mode == "add_penalty_grad_":
                ewc.add_penalty_grad_()
            opt.step()
        if mode == "attach":
            ewc.detach()

    return measure(epoch, ["plain", "add_penalty_grad_", "attach", "penalty()"], "ms/epoch", 1e3)


def host_benchmark():
    model = torch.nn.Sequential(*[torch.nn.Linear(8, 8) for _ in range(50)])
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ewc = fastcl.EWC(model, 1.0)
    ewc.fold({n: torch.rand_like(p) for n, p in model.named_parameters()})
    for p in model.parameters():
        p.grad = torch.zeros_like(p)

    def steps(mode, n=100):
        if mode == "attach":
            ewc.attach(opt)
        for _ in range(n):
            if mode == "add_penalty_grad_":
                ewc.add_penalty_grad_()
            opt.step()
        if mode == "attach":
            ewc.detach()

    return measure(steps, ["step only", "add_penalty_grad_", "attach"], "us/step", 1e6 / 100)


def measure(run, modes, unit, factor):
    for mode in modes:
        run(mode)
    times = {m: [] for m in modes}
    for _ in range(ROUNDS):
        for mode in modes:
            start = time.perf_counter()
            run(mode)
            times[mode].append(time.perf_counter() - start)
    base = statistics.median(times["add_penalty_grad_"])
    for mode in modes:
        med = statistics.median(times[mode])
        print(f"{mode:>18}: {factor * med:9.1f} {unit}   {med / base:.3f}x add_penalty_grad_")


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"penalty backend: {fastcl.backend_info(torch.device('cpu'))['penalty']}")
    epoch_benchmark()
    host_benchmark()
