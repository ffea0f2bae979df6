"""The ops compose with torch.compile (custom ops with fake implementations)."""
import torch

from fastcl.ops import anchored_penalty, distillation_loss, penalty, sqgrad


def test_compiled_training_step_matches_eager():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen, requires_grad=True), torch.randn(7, generator=gen, requires_grad=True)]
    anchors = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    weights = [torch.rand(5, 3, generator=gen), torch.rand(7, generator=gen)]
    student = torch.randn(4, 9, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 9, generator=gen)

    def step(params, student):
        return anchored_penalty(params, anchors, weights, scale=0.5) + distillation_loss(student, teacher, 2.0)

    eager = step(params, student)
    eager_grads = torch.autograd.grad(eager, [*params, student])
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)(params, student)
    compiled_grads = torch.autograd.grad(compiled, [*params, student])
    torch.testing.assert_close(compiled, eager)
    for c, e in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(c, e)


def test_compiled_in_place_ops():
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    p = [torch.randn(6, generator=gen)]
    a = [torch.randn(6, generator=gen)]
    x = torch.randn(3, 4, 5, generator=gen)
    g = torch.randn(3, 4, 2, generator=gen)

    def fused(p, a, grads, out):
        value = penalty(p, a, scale=2.0, grads=grads)
        sqgrad(x, g, out)
        return value

    grads_e, out_e = [torch.zeros(6)], torch.zeros(2, 5)
    value_e = fused(p, a, grads_e, out_e)
    grads_c, out_c = [torch.zeros(6)], torch.zeros(2, 5)
    value_c = torch.compile(fused, backend="aot_eager", fullgraph=True)(p, a, grads_c, out_c)
    torch.testing.assert_close(value_c, value_e)
    torch.testing.assert_close(grads_c[0], grads_e[0])
    torch.testing.assert_close(out_c, out_e)
