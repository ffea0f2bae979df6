r"""Knowledge distillation at temperature T, forward and backward fused.

For one row with student logits ``s`` and teacher logits ``t`` over a vocabulary::

    p_t = softmax(t / T),  log p_s = log_softmax(s / T)
    loss_row = T² · KL(p_t ‖ p_s) = T² · Σ_v p_t,v · (log p_t,v − log p_s,v)
    ∂loss_row/∂s = T · (softmax(s / T) − p_t)

:func:`distillation_loss` reduces over rows: ``"batchmean"`` = mean over (unmasked)
rows, ``"sum"``, or ``"none"`` (per-row losses, shape of the leading dims). This is
Hinton et al.'s ``T²``-scaled KD loss as used by LwF (Li & Hoiem 2017). Gradient flows
to the student only.

Non-finite logits, identical on every backend: the term ``p_t·(log p_t − log p_s)`` is
exactly 0 iff ``p_t == 0`` (a ``−inf`` teacher logit, or underflow); everything else
follows IEEE arithmetic of the formula, so a NaN anywhere in a row, a ``+inf`` teacher or
student logit, or an all-``−inf`` teacher (or student) row gives that row a NaN loss and
a NaN gradient in every entry — never 0, never finite. A student ``−inf`` where
``p_t > 0`` gives a ``+inf`` loss (the KL is infinite).

Backend kernels (``OPS["distill"]``) are called as ``kernel(student, teacher,
temperature, mask, grad_scale)`` with ``student``, ``teacher``: ``[R, V]`` contiguous,
one dtype (float32, bfloat16, float16; float64 for torch only), ``R, V ≥ 1``; ``mask``:
``None`` or a ``[R]`` bool tensor (True = row counts); ``grad_scale``: a Python float
(``1/R`` for ``"batchmean"`` when the op knows ``R``, else 1). They return
``(row_loss, grad)``: ``row_loss`` ``[R]`` unscaled, float32 (float64 for float64
input), and ``grad = grad_scale · T·(softmax(s/T) − softmax(t/T))`` ``[R, V]`` in the
student's dtype, both 0 on masked rows. Math in float32 whatever the input dtype
(:func:`fastcl._dtypes.acc_dtype`).

:func:`fused_linear_distillation` takes hidden states and the head weight instead of
logits and walks row chunks, so the full ``[rows, vocab]`` logits never exist at once.
"""
from __future__ import annotations

import functools

import torch

from .._dtypes import acc_dtype
from .._validate import check_int, check_real
from ._dispatch import choose_backend
from ._library import compiling, register

__all__ = ["distillation_loss", "fused_linear_distillation", "distill_reference", "REDUCTIONS"]

REDUCTIONS = ("batchmean", "sum", "none")


def distill_reference(student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None = None,
                      grad_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch oracle: ``(T²·KL(p_t‖p_s) per row, grad_scale·T·(p_s − p_t))``.

    Written for clarity, not speed (full-size temporaries in the accumulation dtype);
    exact in float64. The fast torch backend is :func:`fastcl.ops._torch_backend.distill`.
    """
    acc = acc_dtype(student.dtype)
    s = student.to(acc) / temperature
    t = teacher.to(acc) / temperature
    log_ps = torch.log_softmax(s, dim=-1)
    log_pt = torch.log_softmax(t, dim=-1)
    pt = log_pt.exp()
    terms = torch.where(pt == 0, torch.zeros_like(pt), pt * (log_pt - log_ps))
    row_loss = temperature**2 * terms.sum(-1)
    grad = (grad_scale * temperature) * (log_ps.exp() - pt)
    if mask is not None:
        row_loss = torch.where(mask, row_loss, torch.zeros_like(row_loss))
        grad = torch.where(mask[:, None], grad, torch.zeros_like(grad))
    return row_loss, grad.to(student.dtype)


# ----------------------------------------------------------------------------- checks


def _check_reduction(reduction) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _check_float_tensor(name: str, value) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")


def _flat_mask(mask, lead_shape, device) -> torch.Tensor | None:
    """``mask`` (bool, shape ``lead_shape``) as a flat contiguous bool tensor on ``device``."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True = the row counts), got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(lead_shape):
        raise ValueError(f"mask must have the logits' leading shape {tuple(lead_shape)}, got {tuple(mask.shape)}")
    return mask.reshape(-1).to(device=device).contiguous()


# ----------------------------------------------------------------------------- kernels


def _distill_impl(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None, grad_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _, kernel = choose_backend("distill", student.device, student.dtype)
    return kernel(student, teacher, temperature, mask, grad_scale)


def _distill_fake(student, teacher, temperature, mask, grad_scale):
    return student.new_empty(student.shape[:1], dtype=acc_dtype(student.dtype)), torch.empty_like(student)


_distill_op = register("fastcl::distill", _distill_impl, _distill_fake)


def _distill_rows(student, teacher, temperature, mask, grad_scale=1.0):
    """Per-row losses and scaled gradients from the chosen backend (through the custom op when compiling)."""
    impl = _distill_op if compiling() else _distill_impl
    return impl(student, teacher, temperature, mask, grad_scale)


# ----------------------------------------------------------------------------- reduction


def _batch_scale(rows: int, mask: torch.Tensor | None):
    """``(grad_scale, count)`` for "batchmean": 1/count folded into the kernel when the count is
    known without a device sync (``count`` None), else ``grad_scale`` 1 and ``count`` a tensor."""
    if mask is None:
        return 1.0 / max(rows, 1), None
    if mask.device.type == "cpu" and not compiling():
        return 1.0 / max(int(mask.sum()), 1), None
    return 1.0, mask.sum().clamp(min=1)


def _reduce(row_loss: torch.Tensor, reduction: str, lead_shape, grad_scale: float, count):
    if reduction == "none":
        return row_loss.reshape(lead_shape)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    return total / count.to(total.dtype) if count is not None else total * grad_scale


def _backward_scale(grad_output: torch.Tensor, count, dtype: torch.dtype):
    """The factor still to apply to gradients computed with the folded scale, or None for 1."""
    scale = grad_output if count is None else grad_output / count
    if count is None and not compiling() and grad_output.device.type == "cpu" and grad_output.item() == 1.0:
        return None  # the usual loss.backward(): the kernel's gradient is final
    return scale.to(acc_dtype(dtype))


def _first_order_only(backward):
    """For a backward whose gradients were computed in forward, i.e. are constants to autograd:
    under ``create_graph=True`` they get a node that raises if a second backward reaches
    them, instead of silently contributing nothing to a second derivative."""

    @functools.wraps(backward)
    def wrapper(ctx, *grad_outputs):
        with torch.no_grad():
            outputs = backward(ctx, *grad_outputs)
        if not torch.is_grad_enabled():
            return outputs
        refuse = torch._C._functions.DelayedError(
            b"fastcl's distillation gradients cannot be differentiated again (double backward is not supported)",
            len(outputs),
        )
        return refuse(*[None if g is None else g.detach().requires_grad_() for g in outputs])

    return wrapper


class _Distill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, mask, reduction, lead_shape):
        grad_scale, count = _batch_scale(student.shape[0], mask) if reduction == "batchmean" else (1.0, None)
        row_loss, grad = _distill_rows(student, teacher, temperature, mask, grad_scale)
        ctx.reduction, ctx.count = reduction, count
        ctx.save_for_backward(grad)
        return _reduce(row_loss, reduction, lead_shape, grad_scale, count)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            scale = grad_output.reshape(-1, 1).to(acc_dtype(grad.dtype))
            out = (grad.to(scale.dtype) * scale).to(grad.dtype)
        else:
            scale = _backward_scale(grad_output, ctx.count, grad.dtype)
            # A 0-dim float32 scale keeps the product in grad's dtype while TensorIterator
            # computes it in float32: one rounding, no full-size float32 temporaries.
            out = grad if scale is None else grad * scale
        return out, None, None, None, None, None


def _empty_result(student_logits: torch.Tensor, reduction: str, lead) -> torch.Tensor:
    """The loss over zero rows: an empty ``[*lead]`` tensor for "none", else 0 (still on the graph)."""
    zero = student_logits.sum(-1).to(acc_dtype(student_logits.dtype)) * 0.0
    return zero if reduction == "none" else zero.sum()


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 2.0,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T² · mean over rows of KL(softmax(t/T) ‖ softmax(s/T))`` over the last dimension.

    Args:
        student_logits: ``[..., V]`` floating point, ``V ≥ 1``; gradient flows here.
        teacher_logits: same shape; treated as a constant (detached). A teacher of another
            floating dtype is not rounded to the student's: both are computed in the wider.
        temperature: T > 0.
        reduction: ``"batchmean"`` (mean over unmasked rows; 0 when there are none),
            ``"sum"`` or ``"none"`` (per-row losses, shape ``[...]``; empty for no rows).
        mask: optional bool tensor of the leading shape; False rows (padding) are ignored.

    The value is in float32 (float64 for float64 logits). Non-finite logits: see the
    module docstring (NaN, never a silently finite loss).
    """
    temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
    _check_reduction(reduction)
    _check_float_tensor("student_logits", student_logits)
    _check_float_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"teacher_logits must have the shape of student_logits {tuple(student_logits.shape)}, "
            f"got {tuple(teacher_logits.shape)}"
        )
    if student_logits.dim() == 0:
        raise ValueError("student_logits needs at least one dimension (the classes), got a 0-dim tensor")
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    if V == 0 and lead.numel() > 0:
        raise ValueError(f"student_logits has {lead.numel()} rows but no classes (last dimension 0)")
    flat_mask = _flat_mask(mask, lead, student_logits.device)
    if student_logits.numel() == 0:
        return _empty_result(student_logits, reduction, lead)
    dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    teacher = teacher_logits.detach().to(device=student_logits.device, dtype=dtype)
    s = student_logits.to(dtype).reshape(-1, V).contiguous()
    return _Distill.apply(s, teacher.reshape(-1, V).contiguous(), temperature, flat_mask, reduction, tuple(lead))


# ----------------------------------------------------------------------------- fused linear


def _has_mm_out_dtype() -> bool:
    ops = getattr(torch.ops.aten, "mm", None)
    return ops is not None and "dtype" in ops.overloads()


_MM_OUT_DTYPE = _has_mm_out_dtype()


def _add_mm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``out += a @ b`` with ``out`` in the accumulation dtype of ``a``/``b``.

    Reduced-precision ``a``/``b`` on CUDA multiply in their own dtype (tensor cores) with
    float32 accumulation and a float32 result; elsewhere (CPU torch has no bf16×bf16→fp32
    product) the operands are widened, which is exact.
    """
    if a.dtype == out.dtype:
        out.addmm_(a, b)
    elif a.is_cuda and _MM_OUT_DTYPE:
        out.add_(torch.mm(a, b, out_dtype=out.dtype))
    else:
        out.addmm_(a.to(out.dtype), b.to(out.dtype))


class _FusedLinearDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
                temperature, mask, chunk_size, reduction):
        R = hidden.shape[0]
        acc = acc_dtype(hidden.dtype)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (bias is not None and ctx.needs_input_grad[2]) else None
        grad_scale, count = _batch_scale(R, mask) if reduction == "batchmean" else (1.0, None)
        row_loss = torch.empty(R, dtype=acc, device=hidden.device)
        for start in range(0, R, chunk_size):
            rows = slice(start, min(R, start + chunk_size))
            h = hidden[rows]
            s = torch.nn.functional.linear(h, weight, bias)
            if teacher_logits is not None:
                t = teacher_logits[rows]
            else:
                t = torch.nn.functional.linear(teacher_hidden[rows], teacher_weight, teacher_bias)
            work = torch.promote_types(s.dtype, t.dtype)
            m = None if mask is None else mask[rows]
            loss_c, grad_s = _distill_rows(s.to(work).contiguous(), t.to(work).contiguous(), temperature, m, grad_scale)
            row_loss[rows] = loss_c
            grad_s = grad_s.to(hidden.dtype)
            if grad_hidden is not None:
                torch.mm(grad_s, weight, out=grad_hidden[rows])
            if grad_weight is not None:
                _add_mm(grad_weight, grad_s.t(), h)
            if grad_bias is not None:
                grad_bias += grad_s.sum(0, dtype=acc)
        ctx.count = count
        ctx.save_for_backward(
            grad_hidden if grad_hidden is not None else torch.empty(0),
            grad_weight if grad_weight is not None else torch.empty(0),
            grad_bias if grad_bias is not None else torch.empty(0),
        )
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return _reduce(row_loss, reduction, (R,), grad_scale, count)

    @staticmethod
    @_first_order_only
    def backward(ctx, grad_output):
        gh, gw, gb = ctx.saved_tensors
        hd, wd, bd = ctx.dtypes
        scale = _backward_scale(grad_output, ctx.count, hd)

        def out(g, dtype):  # g is in dtype (∂h) or its accumulation dtype (∂W, ∂b)
            if not g.numel():
                return None
            return (g if scale is None else g * scale).to(dtype)

        return out(gh, hd), out(gw, wd), out(gb, bd), None, None, None, None, None, None, None, None


def fused_linear_distillation(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    temperature: float = 2.0,
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Distillation loss from hidden states and the LM head, never holding full logits.

    ``loss = distillation_loss(h_s W_sᵀ + b_s, teacher, T)`` where the teacher is either
    ``teacher_logits`` or ``teacher_hidden @ teacher_weightᵀ (+ teacher_bias)``. Rows are
    processed ``chunk_size`` at a time (default: enough rows for ~256 MiB of fp32 logits);
    the gradients for the hidden states, head weight and bias are computed during the
    forward pass (already divided by the row count for "batchmean") and scaled by
    ``grad_output`` in backward only when it is not 1, so peak memory is
    O(chunk · vocab + rows · hidden + vocab · hidden).

    Shapes: ``student_hidden [..., H]``, ``student_weight [V, H]``, ``student_bias [V]``,
    ``teacher_logits [..., V]`` or ``teacher_hidden [..., H_t]`` with ``teacher_weight
    [V, H_t]`` and ``teacher_bias [V]``. The student's hidden states, weight and bias share
    one floating dtype, as do the teacher's; a teacher of a wider dtype is not rounded to
    the student's. ``reduction``: ``"batchmean"`` or ``"sum"``.

    Precision: the logits and ``∂h`` are computed in the student's dtype; ``∂W`` and ``∂b``
    accumulate in float32 (float64 for float64). For bfloat16/float16 on CUDA, ``∂W`` is a
    bf16/fp16 tensor-core product with float32 accumulation, within about ``2⁻⁸`` (relative
    to ``‖∂W‖``) of the float64 reference, like any bf16 GEMM with fp32 accumulation.
    """
    temperature = check_real(temperature, "temperature", low=0.0, low_inclusive=False)
    _check_reduction(reduction)
    if reduction == "none":
        raise ValueError("fused_linear_distillation supports reduction='batchmean' or 'sum', got 'none'")
    _check_float_tensor("student_hidden", student_hidden)
    _check_float_tensor("student_weight", student_weight)
    if (teacher_logits is None) == (teacher_hidden is None):
        raise ValueError("give exactly one of teacher_logits or teacher_hidden (+ teacher_weight)")
    if teacher_hidden is not None and teacher_weight is None:
        raise ValueError("teacher_hidden needs teacher_weight")
    if teacher_hidden is None and (teacher_weight is not None or teacher_bias is not None):
        raise ValueError("teacher_weight and teacher_bias go with teacher_hidden, not teacher_logits")
    if student_hidden.dim() == 0:
        raise ValueError("student_hidden needs at least one dimension (the hidden size), got a 0-dim tensor")
    if student_weight.dim() != 2 or student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_weight must be [V, H] with H = hidden size {student_hidden.shape[-1]}, got {tuple(student_weight.shape)}")
    if student_weight.dtype != student_hidden.dtype:
        raise TypeError(f"student_weight has dtype {student_weight.dtype} but student_hidden has {student_hidden.dtype}; use one dtype")
    lead = student_hidden.shape[:-1]
    V = student_weight.shape[0]
    if V == 0:
        raise ValueError("student_weight has no rows (vocabulary size 0)")
    if student_bias is not None:
        _check_float_tensor("student_bias", student_bias)
        if tuple(student_bias.shape) != (V,):
            raise ValueError(f"student_bias must have shape ({V},), got {tuple(student_bias.shape)}")
        if student_bias.dtype != student_hidden.dtype:
            raise TypeError(f"student_bias has dtype {student_bias.dtype} but student_hidden has {student_hidden.dtype}; use one dtype")
    if teacher_logits is not None:
        _check_float_tensor("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != (*lead, V):
            raise ValueError(f"teacher_logits must have shape {(*lead, V)}, got {tuple(teacher_logits.shape)}")
    else:
        _check_float_tensor("teacher_hidden", teacher_hidden)
        _check_float_tensor("teacher_weight", teacher_weight)
        if tuple(teacher_hidden.shape[:-1]) != tuple(lead) or teacher_weight.shape != (V, teacher_hidden.shape[-1]):
            raise ValueError(
                f"teacher_hidden {tuple(teacher_hidden.shape)} / teacher_weight {tuple(teacher_weight.shape)} do not match rows {tuple(lead)} and vocab {V}"
            )
        if teacher_weight.dtype != teacher_hidden.dtype:
            raise TypeError(f"teacher_weight has dtype {teacher_weight.dtype} but teacher_hidden has {teacher_hidden.dtype}; use one dtype")
        if teacher_bias is not None:
            _check_float_tensor("teacher_bias", teacher_bias)
            if tuple(teacher_bias.shape) != (V,) or teacher_bias.dtype != teacher_hidden.dtype:
                raise ValueError(f"teacher_bias must be ({V},) in {teacher_hidden.dtype}, got {tuple(teacher_bias.shape)} in {teacher_bias.dtype}")
    if chunk_size is not None:
        chunk_size = check_int(chunk_size, "chunk_size", low=1)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    R = hidden.shape[0]
    flat_mask = _flat_mask(mask, lead, hidden.device)
    if chunk_size is None:
        chunk_size = max(1, min(R, (256 * 2**20) // (4 * V)))
    device = hidden.device
    t_logits = None if teacher_logits is None else teacher_logits.detach().reshape(R, V).to(device)
    t_hidden = None if teacher_hidden is None else teacher_hidden.detach().reshape(R, -1).to(device)
    t_weight = None if teacher_weight is None else teacher_weight.detach().to(device)
    t_bias = None if teacher_bias is None else teacher_bias.detach().to(device)
    return _FusedLinearDistill.apply(
        hidden, student_weight, student_bias, t_logits, t_hidden, t_weight, t_bias, temperature, flat_mask, chunk_size, reduction
    )
