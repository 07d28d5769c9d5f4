"""The Triton path of the chunked linear-attention engines: which backend serves a call, the launchers of
:mod:`._triton_kernels`, and the autograd Function around them.

The forward runs in Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``, for tests). The
backward is **not** a Triton kernel: it recomputes the call with the torch-ops chunked engine
(:mod:`qkv.linear.chunked`) and differentiates that — one torch forward plus its chunked backward, on the same
device, with the torch engine's memory (nothing per step or per chunk is kept from the Triton forward).

Shapes: q, k ``(B, Hk, N, D)``, v ``(B, H, N, Dv)``, beta/g ``(B, H, N)``; states ``(B, H, D, Dv)`` fp32.
"""
from __future__ import annotations

import contextvars
import functools
import math
import os

import torch
from torch.autograd.function import once_differentiable

from ..engines.triton.load import Recorder, exec_kernels, interpreting
from ..engines.triton.load import recording as record_launches
from ._validate import DeltaCall, LinearCall, finish_linear

__all__ = ["BACKENDS", "MAX_DIM", "reasons", "resolve", "run_linear", "run_delta", "recording", "kernels",
           "interpreting", "chunk_of", "REPORT_KERNELS", "report_items", "report_launches"]

BACKENDS = ("auto", "torch", "triton")
#: The largest head dim (D or Dv, features included) the kernels take; one state block holds all of D.
MAX_DIM = 256
_FMAPS = {"identity": 0, "elu1": 1, "relu": 2}


# ------------------------------------------------------------------------------------------------ loading

@functools.cache
def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


def kernels(interpret: bool):
    """The kernel module, compiled (``interpret=False``) or for Triton's interpreter: ``_triton_kernels.py``
    executed once per mode, so that one process can run interpreted kernels on CPU tensors and still compile the
    same kernels for a GPU target."""
    return exec_kernels(f"{__package__}._triton_kernels_{'interpreted' if interpret else 'compiled'}",
                        os.path.join(os.path.dirname(__file__), "_triton_kernels.py"), interpret)


# (arch, calls) while recording launches for a compile target (see recording), else None
_TARGET: contextvars.ContextVar = contextvars.ContextVar("qkv_linear_triton_target", default=None)


def recording(arch: int):
    """Inside this block the launchers run no kernel: they record each launch they would make on a GPU of ``arch``
    (80, 90) as ``(kernel name, JITFunction, args, kwargs)`` in the yielded list, so that ``qkv kernels`` can
    compile them for that target without a GPU. Tensors may be CPU tensors."""
    return record_launches(_TARGET, arch)


def _k():
    if _TARGET.get() is not None:
        return Recorder(_TARGET.get()[1], lambda: kernels(interpret=False))
    return kernels(interpret=interpreting())


def _arch(t: torch.Tensor) -> int | None:
    """The compile target of t's device (80, 90), or None under the interpreter."""
    if _TARGET.get() is not None:
        return _TARGET.get()[0]
    if t.device.type != "cuda":
        return None
    major, _ = torch.cuda.get_device_capability(t.device)
    return 90 if major >= 9 else 80


# ------------------------------------------------------------------------------------------------ backend choice

def _device_reason(t: torch.Tensor) -> str | None:
    if t.device.type == "cuda" or _TARGET.get() is not None:
        return None
    if interpreting():
        return None
    return (f"the Triton kernels run on CUDA tensors (got {t.device}); set TRITON_INTERPRET=1 to run them on CPU "
            f"tensors in Triton's interpreter (slow: for tests)")


def reasons(c: LinearCall | DeltaCall) -> list[str]:
    """Every reason the Triton kernels cannot serve the validated call ``c`` ([]: they can)."""
    out = []
    missing = _triton_missing()
    if missing:
        out.append(missing)
    dev = _device_reason(c.v)
    if dev:
        out.append(dev)
    if c.q.dtype == torch.float64:
        out.append("float64 inputs: the kernels compute in fp32 (use backend='torch' for fp64)")
    D, Dv = c.q.shape[-1], c.v.shape[-1]
    if isinstance(c, LinearCall):
        if not c.causal:
            out.append("causal=False: the non-causal form is two matmuls, run by the torch engine")
        Dv += c.normalize
    if D > MAX_DIM:
        out.append(f"head dim D={D} > {MAX_DIM}")
    if Dv > MAX_DIM:
        out.append(f"value head dim Dv={Dv}{' (with the normaliser column)' if Dv != c.v.shape[-1] else ''} > "
                   f"{MAX_DIM}")
    return out


def resolve(backend, c: LinearCall | DeltaCall) -> str:
    """``"torch"`` or ``"triton"`` for ``backend`` ("auto", "torch", "triton") and the validated call ``c``.
    "auto": triton on CUDA tensors when triton is importable and the kernels serve the call, torch elsewhere;
    "triton" that cannot serve the call raises ValueError naming every reason."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        if c.v.device.type != "cuda":
            return "torch"
        return "torch" if reasons(c) else "triton"
    why = reasons(c)
    if why:
        raise ValueError("backend='triton' cannot run this call: " + "; ".join(why))
    return "triton"


# ------------------------------------------------------------------------------------------------ launchers

def _pow2(x: int, lo: int = 16) -> int:
    return max(lo, 1 << max(0, (x - 1).bit_length()))


def chunk_of(chunk_size: int) -> int:
    """The kernels' chunk (16, 32 or 64 tokens): the largest power of two <= chunk_size, within [16, 64]. The
    results do not depend on it beyond rounding."""
    return max(16, min(64, 1 << (max(1, chunk_size).bit_length() - 1)))


def _prec(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


def _config(D: int, arch: int | None, elem: int, delta: bool):
    """(value columns per state/output program, D block of the chunk-parallel kernels, rows per step of the state
    kernel, warps of the state kernel, warps of the output kernel, the most tokens per chunk). Chosen so that
    ``qkv kernels`` reports no spill on sm_80/sm_90 (fp32 inputs take exact fp32 products on CUDA cores: smaller
    tiles, 32-token chunks); speed unmeasured beyond benchmarks/gpu_linear.py's sizes. Under the interpreter: small
    blocks, so that the tests' shapes span several."""
    bd = _pow2(D)
    if arch is None:
        return 16, 16, 8, 4, 4, 64
    if elem == 4:
        w_state = 8 if bd >= 128 else 4
        if not delta:
            w_state = 8 if bd <= 64 or (bd >= 256 and arch < 90) else 4
        return (32 if bd <= 64 else 16), min(bd, 32), 16, w_state, 4, 32
    w_state = 8 if bd >= 128 else 4
    if not delta and bd == 128 and arch < 90:
        w_state = 4
    return (64 if bd <= 64 else 32), min(bd, 64), 32 if bd <= 128 else 16, w_state, 8 if bd <= 64 else 4, 64


def _opts(arch):
    """Compile options on a GPU: FMA contraction on (Triton's default today, stated so that it stays)."""
    return {} if arch is None else {"enable_fp_fusion": True}


def _strides3(t):
    return tuple(0 if n == 1 else s for n, s in zip(t.shape, t.stride()))


def _scan_and_out(K, q, k, v, U, W, g, s0, out, *, H, rep, N, D, Dv, BT, fmap, l2, delta, ones, scale, prec, arch):
    """The state kernel then the output kernel; returns the final state (B·H, D, Dv) fp32."""
    BH = out.shape[0] * out.shape[1]
    NC = -(-N // BT)
    bv, bk, bs, w_state, w_out, _ = _config(D, arch, q.element_size(), delta)
    bd = _pow2(D)
    dev = q.device
    Hs = torch.empty(BH, NC, D, Dv, dtype=torch.float32, device=dev)
    S = torch.empty(BH, D, Dv, dtype=torch.float32, device=dev)
    gz = g if g is not None else out
    gs = _strides3(g) if g is not None else (0, 0, 0)
    Wz = W if W is not None else S
    Uz = U if U is not None else S
    s0z = s0 if s0 is not None else S
    nv = -(-Dv // bv)
    flags = dict(FMAP=fmap, GATED=g is not None, L2=l2, DELTA=delta, ONES=ones, PREC=prec)
    K._state_kernel[(nv, BH)](
        k, v, Wz, Uz, gz, s0z, Hs, S, *k.stride(), *v.stride(), *gs, H, rep, N, D, Dv, NC,
        BT=BT, BS=min(bs, BT), BD=bd, BV=bv, HAS_S0=s0 is not None, **flags, num_warps=w_state, **_opts(arch))
    K._out_kernel[(NC, nv, BH)](
        q, k, v, Uz, gz, Hs, out, *q.stride(), *k.stride(), *v.stride(), *gs, *out.stride(),
        H, rep, N, D, Dv, NC, float(scale), BT=BT, BK=bk, BV=bv, **flags, num_warps=w_out, **_opts(arch))
    return S


def _run_delta_kernels(c: DeltaCall, chunk: int):
    """(o (B, H, N, Dv) in q's dtype, S (B, H, D, Dv) fp32) of a validated delta-rule call."""
    K = _k()
    q, k, v, beta, g = c.q, c.k, c.v, c.beta, c.g
    B, H, N, Dv = v.shape
    D = q.shape[-1]
    arch = _arch(v)
    bv, bk, _, _, _, most = _config(D, arch, q.element_size(), True)
    BT = min(chunk, most)
    NC = -(-N // BT)
    BH = B * H
    prec = _prec(q)
    W = torch.empty(BH, N, D, dtype=torch.float32, device=v.device)
    U = torch.empty(BH, N, Dv, dtype=torch.float32, device=v.device)
    gz = g if g is not None else beta
    K._wy_kernel[(NC, BH)](
        k, v, beta, gz, W, U, *k.stride(), *v.stride(), *_strides3(beta), *(_strides3(g) if g is not None else
                                                                           (0, 0, 0)),
        H, H // q.shape[1], N, D, Dv, BT=BT, BK=bk, BV=bv, GATED=g is not None, L2=c.qk_l2norm, PREC=prec,
        num_warps=4 if arch is None else 8, **_opts(arch))
    out = torch.empty(B, H, N, Dv, dtype=c.out_dtype, device=v.device)
    s0 = None if c.state is None else c.state.contiguous()
    S = _scan_and_out(K, q, k, v, U, W, g, s0, out, H=H, rep=H // q.shape[1], N=N, D=D, Dv=Dv, BT=BT, fmap=0,
                      l2=c.qk_l2norm, delta=True, ones=False, scale=c.scale, prec=prec, arch=arch)
    return out, S.view(B, H, D, Dv)


def _run_linear_kernels(c: LinearCall, feature_map, chunk: int):
    """(o (B, H, N, Dv) in q's dtype, S (B, H, F, Dv[+1]) fp32) of a validated causal linear-attention call."""
    K = _k()
    B, H, N, Dv = c.v.shape
    if c.custom_map:                     # the features made in torch (a callable), then the identity map here
        q, k, v, g = c.features(0, N)
        fmap, scale = 0, 1.0
    else:
        q, k, v, g = c.q, c.k, c.v, c.g
        fmap = _FMAPS[feature_map]
        scale = 1.0 / math.sqrt(q.shape[-1]) if c.scale is None else c.scale
    D = q.shape[-1]
    Dv1 = Dv + c.normalize
    arch = _arch(c.v)
    out = torch.empty(B, H, N, Dv1, dtype=torch.float32 if c.normalize else c.out_dtype, device=c.v.device)
    s0 = None if c.state is None else c.state.contiguous()
    BT = min(chunk, _config(D, arch, c.q.element_size(), False)[-1])
    S = _scan_and_out(K, q, k, v, None, None, g, s0, out, H=H, rep=H // q.shape[1], N=N, D=D, Dv=Dv1, BT=BT,
                      fmap=fmap, l2=False, delta=False, ones=c.normalize, scale=scale, prec=_prec(c.q), arch=arch)
    o = finish_linear(c, out) if c.normalize else out
    return o, S.view(B, H, D, Dv1)


# ------------------------------------------------------------------------------------------------ autograd

class _TritonForward(torch.autograd.Function):
    """Outputs ``(o, S)`` of ``fwd()`` (the Triton kernels); the backward differentiates ``recompute(*tensors)``
    (the torch-ops chunked engine on the same inputs) — not a Triton backward."""

    @staticmethod
    def forward(ctx, fwd, recompute, *tensors):
        ctx.recompute = recompute
        ctx.save_for_backward(*tensors)
        ctx.set_materialize_grads(False)
        return fwd()

    @staticmethod
    @once_differentiable
    def backward(ctx, do, dS):
        saved = ctx.saved_tensors
        need = ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaves = [None if t is None else t.detach().requires_grad_(n) for t, n in zip(saved, need)]
            o, S = ctx.recompute(*leaves)
        outs = [(x, d) for x, d in ((o, do), (S, dS)) if d is not None]
        wrt = [t for t, n in zip(leaves, need) if n and t is not None]
        grads = list(torch.autograd.grad([x for x, _ in outs], wrt, [d for _, d in outs], allow_unused=True)) \
            if outs and wrt else [None] * len(wrt)
        full = [grads.pop(0) if n and t is not None else None for t, n in zip(leaves, need)]
        return (None, None, *full)


def _apply(fwd, recompute, tensors, return_state: bool):
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        o, S = _TritonForward.apply(fwd, recompute, *tensors)
    else:
        o, S = fwd()
    return (o, S) if return_state else o


def run_linear(c: LinearCall, *, feature_map, decay, normalize, scale, chunk_size, eps, return_state: bool):
    """A validated causal linear-attention call ``c`` on the Triton kernels (the arguments as given, for the
    backward's recomputation). Returns ``o`` or ``(o, state)`` like :func:`qkv.linear.linear_attention`."""
    from .chunked import linear_attention

    dec = decay if isinstance(decay, torch.Tensor) else None

    def recompute(q, k, v, d, s0):
        return linear_attention(q, k, v, causal=True, feature_map=feature_map, decay=d if dec is not None else decay,
                                normalize=normalize, scale=scale, chunk_size=chunk_size, initial_state=s0,
                                return_state=True, eps=eps, backend="torch")

    tensors = (c.q, c.k, c.v, dec, c.state)
    if c.v.shape[0] == 0 or c.v.shape[2] == 0:
        out = recompute(*tensors)
        return out if return_state else out[0]
    return _apply(lambda: _run_linear_kernels(c, feature_map, chunk_of(c.chunk_size)), recompute, tensors,
                  return_state)


def run_delta(c: DeltaCall, *, scale, chunk_size, return_state: bool):
    """A validated delta-rule call ``c`` on the Triton kernels. Returns ``o`` or ``(o, state)`` like
    :func:`qkv.linear.delta_rule`."""
    from .chunked import delta_rule

    def recompute(q, k, v, beta, g, s0):
        return delta_rule(q, k, v, beta, g=g, scale=scale, chunk_size=chunk_size, initial_state=s0,
                          return_state=True, qk_l2norm=c.qk_l2norm, backend="torch")

    tensors = (c.q, c.k, c.v, c.beta, c.g, c.state)
    if c.v.shape[0] == 0 or c.v.shape[2] == 0:
        out = recompute(*tensors)
        return out if return_state else out[0]
    return _apply(lambda: _run_delta_kernels(c, chunk_of(c.chunk_size)), recompute, tensors, return_state)


# ------------------------------------------------------------------------------------------------ qkv kernels

#: The kernels in ``qkv kernels``' report and the variants each is compiled in: "delta" (gated, l2-normalised
#: keys: the most registers of the delta rule) and "linear" (per-token decays, elu + 1 features, the normaliser).
REPORT_KERNELS = {"lin_wy": ("delta",), "lin_state": ("delta", "linear"), "lin_out": ("delta", "linear")}
_KERNEL_NAMES = {"lin_wy": "_wy_kernel", "lin_state": "_state_kernel", "lin_out": "_out_kernel"}


def report_items(archs, head_dims, dtypes, kernels_=tuple(REPORT_KERNELS)):
    """``qkv kernels``' items for these kernels: (kernel, arch, head dim, element bytes, variant, launches)."""
    return [(kern, arch, bd, elem, var, report_launches) for arch in archs for kern in kernels_
            if kern in REPORT_KERNELS for bd in head_dims for elem in dtypes for var in REPORT_KERNELS[kern]]


def report_launches(kernel: str, arch: int, block_d: int, elem: int, variant: str, config=None):
    """The launches of ``kernel`` for a GPU of ``arch`` at head dims D = Dv = ``block_d`` (``elem``: input bytes,
    2 = bf16, 4 = fp32), recorded on small CPU tensors: [(name, JITFunction, args, kwargs)]."""
    from .chunked import delta_rule, linear_attention

    dt = torch.bfloat16 if elem == 2 else torch.float32
    B, H, N = 1, 2, 256
    q, k = torch.zeros(B, H, N, block_d, dtype=dt), torch.zeros(B, H, N, block_d, dtype=dt)
    g = torch.zeros(B, H, N, dtype=dt)
    with torch.no_grad(), recording(arch) as calls:
        if variant == "delta":
            delta_rule(q, k, torch.zeros(B, H, N, block_d, dtype=dt), g, g=g, qk_l2norm=True, backend="triton")
        else:           # with the normaliser's column: Dv + 1 = block_d
            linear_attention(q, k, torch.zeros(B, H, N, block_d - 1, dtype=dt), decay=g.float(), normalize=True,
                             backend="triton")
    return [c for c in calls if c[0] == _KERNEL_NAMES[kernel]]
