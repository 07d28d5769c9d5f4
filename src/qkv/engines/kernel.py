"""Autograd for engines that compute their own forward and backward (kernel engines), written once.

A :class:`KernelEngine` implements four things, on tensors, with no autograd of its own:

* ``plan(call, training) -> plan``: a tensorless plan from the call's static facts (sizes, dtypes, flags —
  never tensor data), e.g. which inner path runs and which extra tensors the forward keeps for the backward;
* ``aux_meta(call, plan) -> [(shape, dtype), ...]``: those extra tensors' shapes (for torch.compile's fake
  tensors);
* ``fwd(call, plan) -> (out, lse, aux)``: out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) in the
  accumulation dtype, the extra tensors;
* ``bwd(call, plan, out, lse, aux, dout, dlse, needs) -> (dq, dk, dv, dbias, dcaptures)`` where ``needs`` says
  which of (q, k, v, bias, *captures that require grad) want a gradient.

This module turns them into a differentiable ``forward(call)`` by the book: every tensor the backward reads
(q, k, v, bias, ALiBi slopes, the mask tensor, the score_mod's captured tensors, out, lse, aux) goes through
``save_for_backward`` — so an in-place change between forward and backward raises autograd's error — and
``ctx`` keeps only the tensorless call and plan. Gradients of the score_mod's captured tensors are returned to
autograd like any input's. In eager mode the wrapper is a ``torch.autograd.Function`` (``setup_context``
style: ``torch.func.grad`` works); under ``torch.compile`` tensor-only calls go through the
``torch.library`` custom ops ``qkv::kernel_fwd`` / ``qkv::kernel_bwd`` (fake implementations and registered
autograd), so the graph does not break. Double backward raises a clear error.
"""
from __future__ import annotations

import torch

from ..core.call import Call, prepare
from ..core.masks import BlockMask
from .base import Engine

__all__ = ["KernelEngine"]

_KERNELS: dict[str, KernelEngine] = {}


class KernelEngine(Engine):
    """An engine whose forward and backward are its own (see the module docstring)."""

    def register_kernel(self) -> KernelEngine:
        """Make this engine reachable by name from the custom ops (done once, by the engine's module)."""
        _KERNELS[self.name] = self
        return self

    # ---- what an engine implements
    def plan(self, call: Call, training: bool):
        raise NotImplementedError

    def aux_meta(self, call: Call, plan) -> list:
        return []

    def fwd(self, call: Call, plan):
        raise NotImplementedError

    def bwd(self, call: Call, plan, out, lse, aux, dout, dlse, needs):
        raise NotImplementedError

    # ---- the differentiable forward
    def forward(self, call: Call):
        if torch.compiler.is_compiling():
            if _op_ready(call):
                out, lse, _ = torch.ops.qkv.kernel_fwd(self.name, *_op_args(call), _needs_grad(call))
                return out, lse.to(call.lse_dtype)
            return torch.compiler.disable(self._eager, recursive=True)(call)
        return self._eager(call)

    def _eager(self, call: Call):
        if not _needs_grad(call):
            out, lse, _ = self.fwd(call, self.plan(call, False))
            return out, lse.to(call.lse_dtype)
        if call.score_mod is not None:
            _check_captures(call)
        inputs = call.inputs()
        res = _Fn.apply(self, _strip(call), self.plan(call, True), *inputs)
        return res[0], res[1].to(call.lse_dtype)


def _needs_grad(call: Call) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (call.q, call.k, call.v, call.bias, *call.captures))


def _strip(call: Call) -> Call:
    """The call without its tensors (what ctx may keep); rebuilt with the saved tensors in the backward."""
    return call.with_inputs(None, None, None, None, None, None, call.captures)


def _check_captures(call: Call) -> None:
    """A score_mod that reads a grad-requiring tensor qkv cannot see would lose its gradient: refuse it."""
    lifted = call.lifted
    mod = lifted.bind(tuple(t.detach() for t in lifted.tensors))
    z = torch.zeros(1, 1, 1, 1, dtype=call.acc_dtype, device=call.device)
    i = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=call.device)
    with torch.enable_grad():
        probe = mod(z, i, i, i, i)
    if isinstance(probe, torch.Tensor) and probe.requires_grad:
        raise ValueError("score_mod reads a tensor that requires grad from somewhere qkv cannot see (not a closure "
                         "variable, default argument or module global of the function: e.g. an attribute of an "
                         "object); capture the tensor itself in the closure, or use backend='reference'")


class _Fn(torch.autograd.Function):
    """The eager autograd wrapper: inputs (engine, tensorless call, plan, q, k, v, bias, alibi, mask, *caps)."""

    @staticmethod
    def forward(engine, call, plan, q, k, v, bias, alibi, mask, *caps):
        full = call.with_inputs(q, k, v, bias, alibi, mask, caps)
        out, lse, aux = engine.fwd(full, plan)
        return (out, lse, *aux)

    @staticmethod
    def setup_context(ctx, inputs, output):
        engine, call, plan, q, k, v, bias, alibi, mask, *caps = inputs
        out, lse, *aux = output
        ctx.engine, ctx.call, ctx.plan, ctx.n_aux = engine, call, plan, len(aux)
        ctx.save_for_backward(q, k, v, bias, alibi, mask, out, lse, *aux, *caps)
        ctx.mark_non_differentiable(*aux)
        ctx.set_materialize_grads(False)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse, *_):
        q, k, v, bias, alibi, mask, out, lse, *rest = ctx.saved_tensors
        aux, caps = rest[:ctx.n_aux], rest[ctx.n_aux:]
        need = ctx.needs_input_grad
        # captures that need a gradient become leaves the engine differentiates the score_mod against
        caps = tuple(c.detach().requires_grad_(n) for c, n in zip(caps, need[9:]))
        call = ctx.call.with_inputs(q, k, v, bias, alibi, mask, caps)
        if dout is None:
            dout = torch.zeros_like(out)
        needs = (need[3], need[4], need[5], need[6], *need[9:])
        dq, dk, dv, dbias, dcaps = ctx.engine.bwd(call, ctx.plan, out, lse, aux, dout, dlse, needs)
        it = iter(dcaps)
        dcaps = [next(it) if n else None for n in need[9:]]
        return (None, None, None, dq, dk, dv, dbias, None, None, *dcaps)


# ------------------------------------------------------------------------------------------ custom ops

def _op_ready(call: Call) -> bool:
    """Tensor-only calls go through the custom ops (no callable to carry; a BlockMask travels as a token)."""
    return call.score_mod is None and (call.mask is None or isinstance(call.mask, (torch.Tensor, BlockMask))) \
        and call.q_base == 0 and call.k_base == 0


def _op_args(call: Call) -> tuple:
    """The custom ops' arguments for a call: its tensors and scalars (a BlockMask by its token)."""
    left, right = call.window if call.window is not None else (None, None)
    return (call.q, call.k, call.v, call.bias, call.alibi, call.mask_tensor,
            call.mask.token if isinstance(call.mask, BlockMask) else 0,
            call.causal, -1 if left is None else left, -1 if right is None else right,
            0.0 if call.softcap is None else call.softcap, call.scale, call.dropout_p, call.seed, call.return_lse)


def _op_call(q, k, v, bias, alibi, mask, block_mask, causal, left, right, softcap, scale, dropout_p, seed,
             return_lse) -> Call:
    """The Call the custom ops' arguments describe (rebuilt by the same validation)."""
    window = None if left == -1 and right == -1 else (None if left == -1 else left, None if right == -1 else right)
    m = BlockMask.lookup(block_mask) if block_mask else mask
    return prepare(q, k, v, causal=causal, window=window, mask=m, bias=bias, alibi_slopes=alibi,
                   softcap=softcap or None, scale=scale, dropout_p=dropout_p, return_lse=return_lse, _seed=seed)


@torch.library.custom_op("qkv::kernel_fwd", mutates_args=())
def _kernel_fwd(engine: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                alibi: torch.Tensor | None, mask: torch.Tensor | None, block_mask: int, causal: bool, left: int,
                right: int, softcap: float, scale: float, dropout_p: float, seed: int, return_lse: bool,
                training: bool) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    call = _op_call(q, k, v, bias, alibi, mask, block_mask, causal, left, right, softcap, scale, dropout_p, seed,
                    return_lse)
    eng = _KERNELS[engine]
    out, lse, aux = eng.fwd(call, eng.plan(call, training))
    return out, lse, list(aux)


@_kernel_fwd.register_fake
def _(engine, q, k, v, bias, alibi, mask, block_mask, causal, left, right, softcap, scale, dropout_p, seed,
      return_lse, training):
    call = _op_call(q, k, v, bias, alibi, mask, block_mask, causal, left, right, softcap, scale, dropout_p, seed,
                    return_lse)
    eng = _KERNELS[engine]
    B, Hq, Nq, _ = q.shape
    out = q.new_empty(B, Hq, Nq, v.shape[-1])
    lse = q.new_empty(B, Hq, Nq, dtype=call.acc_dtype)
    return out, lse, [q.new_empty(shape, dtype=dt) for shape, dt in eng.aux_meta(call, eng.plan(call, training))]


@torch.library.custom_op("qkv::kernel_bwd", mutates_args=())
def _kernel_bwd(engine: str, dout: torch.Tensor, dlse: torch.Tensor | None, out: torch.Tensor, lse: torch.Tensor,
                aux: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                bias: torch.Tensor | None, alibi: torch.Tensor | None, mask: torch.Tensor | None, block_mask: int,
                causal: bool, left: int, right: int, softcap: float, scale: float, dropout_p: float, seed: int,
                return_lse: bool, need_bias: bool) -> list[torch.Tensor]:
    call = _op_call(q, k, v, bias, alibi, mask, block_mask, causal, left, right, softcap, scale, dropout_p, seed,
                    return_lse)
    eng = _KERNELS[engine]
    dq, dk, dv, dbias, _ = eng.bwd(call, eng.plan(call, True), out, lse, aux, dout, dlse,
                                   (True, True, True, need_bias))
    return [dq, dk, dv] + ([dbias] if need_bias else [])


@_kernel_bwd.register_fake
def _(engine, dout, dlse, out, lse, aux, q, k, v, bias, alibi, mask, block_mask, causal, left, right, softcap,
      scale, dropout_p, seed, return_lse, need_bias):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)] + \
        ([torch.empty_like(bias)] if need_bias else [])


def _op_setup(ctx, inputs, output):
    engine, q, k, v, bias, alibi, mask, *scalars = inputs
    out, lse, aux = output
    ctx.engine, ctx.scalars, ctx.n_aux = engine, scalars[:-1], len(aux)   # the training flag is not bwd's
    ctx.need_bias = bias is not None and bias.requires_grad
    ctx.save_for_backward(q, k, v, bias, alibi, mask, out, lse, *aux)


def _op_backward(ctx, dout, dlse, daux):
    q, k, v, bias, alibi, mask, out, lse, *aux = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    grads = torch.ops.qkv.kernel_bwd(ctx.engine, dout, dlse, out, lse, list(aux), q, k, v, bias, alibi, mask,
                                     *ctx.scalars, ctx.need_bias)
    dbias = grads[3] if ctx.need_bias else None
    return (None, grads[0], grads[1], grads[2], dbias) + (None,) * (3 + len(ctx.scalars))


_kernel_fwd.register_autograd(_op_backward, setup_context=_op_setup)
