"""The tiled engine: FlashAttention's algorithm written in torch ops, so it runs on any torch device.

Forward: for each block of queries, an online softmax over the kv tiles the mask leaves visible (runs of
consecutive tiles are fused into one matmul; full tiles skip per-element masking, empty tiles are never
touched); only the output and the row logsumexp are kept. Backward recomputes the probabilities tile by
tile from that logsumexp. Memory is O(N·block), never O(N²). GQA folds the query heads of one kv head into
the rows of each matmul, so K and V are never repeated.
"""
from __future__ import annotations

import torch

from ._call import Call

__all__ = ["tiled_attention", "BLOCK_Q", "BLOCK_K", "MAX_CHUNK"]

BLOCK_Q = 128      # query rows per step
BLOCK_K = 128      # kv tile (the granularity at which masks are skipped)
MAX_CHUNK = 1024   # most keys per fused matmul (bounds the temporary score tile at BLOCK_Q × MAX_CHUNK)


def _schedule(call: Call, bq: int, bk: int):
    """Per query block, the kv runs to visit: a list of (k0, k1, partial) with k1 - k0 <= MAX_CHUNK."""
    Nq, Nk = call.Nq, call.Nk
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    state = call.block_state(bq, bk)
    if state is None:
        runs = [(k0, min(k0 + MAX_CHUNK, Nk), False) for k0 in range(0, Nk, MAX_CHUNK)]
        return [runs] * nqb
    st = state.reshape(-1, nqb, nkb)
    visit = (st > 0).any(0).tolist()
    full = (st == 2).all(0).tolist()
    per_run = max(1, MAX_CHUNK // bk)
    sched = []
    for i in range(nqb):
        runs, j = [], 0
        while j < nkb:
            if not visit[i][j]:
                j += 1
                continue
            j0, f = j, full[i][j]
            while j < nkb and visit[i][j] and full[i][j] == f and j - j0 < per_run:
                j += 1
            runs.append((j0 * bk, min(j * bk, Nk), not f))
        sched.append(runs)
    return sched


def _fwd(call: Call, q, k, v, bq, sched):
    B, Hq, Hkv, G, Nq, D, Dv = call.B, call.Hq, call.Hkv, call.G, call.Nq, call.D, call.Dv
    acc = call.acc_dtype
    q4 = q.reshape(B, Hkv, G, Nq, D)
    k32, v32 = k.to(acc), v.to(acc)
    out = torch.empty(B, Hkv, G, Nq, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, Nq, dtype=torch.float32, device=q.device)
    drop = call.dropout_p
    for i, runs in enumerate(sched):
        q0, q1 = i * bq, min((i + 1) * bq, Nq)
        n = q1 - q0
        if not runs:
            out[..., q0:q1, :] = 0
            lse[..., q0:q1] = float("-inf")
            continue
        qb = (q4[..., q0:q1, :].to(acc) * call.scale).reshape(B, Hkv, G * n, D)
        m = l = o = None
        for k0, k1, partial in runs:
            s = torch.matmul(qb, k32[:, :, k0:k1].transpose(-1, -2)).view(B, Hq, n, k1 - k0)
            if call.has_mods:
                s = call.scores(s, q0, q1, k0, k1)
            if partial:
                s = s.masked_fill(~call.visible(q0, q1, k0, k1), float("-inf"))
            m_new = s.amax(-1, keepdim=True)
            if m is not None:
                m_new = torch.maximum(m, m_new)
            m_safe = m_new.masked_fill(m_new == float("-inf"), 0.0)   # a row with nothing visible yet
            p = s.sub_(m_safe).exp_() if s.is_contiguous() else torch.exp(s - m_safe)
            ls = p.sum(-1, keepdim=True)
            if drop:
                p = p * call.keep(q0, q1, k0, k1) * (1.0 / (1.0 - drop))
            pv = torch.matmul(p.view(B, Hkv, G * n, k1 - k0), v32[:, :, k0:k1])
            if m is None:
                l, o = ls, pv
            else:
                alpha = torch.exp(m - m_safe)
                l = l * alpha + ls
                o = o.mul_(alpha.view(B, Hkv, G * n, 1)).add_(pv)
            m, m_last = m_new, m_safe
        empty = l == 0
        o = o / l.masked_fill(empty, 1.0).view(B, Hkv, G * n, 1)
        out[..., q0:q1, :] = o.view(B, Hkv, G, n, Dv)
        lse[..., q0:q1] = torch.where(empty, float("-inf"), m_last + torch.log(l.masked_fill(empty, 1.0))).squeeze(-1)
    return out.view(B, Hq, Nq, Dv), lse


def _bwd(call: Call, q, k, v, out, lse, dout, dlse, bq, sched, need_dbias):
    B, Hq, Hkv, G, Nq, D, Dv = call.B, call.Hq, call.Hkv, call.G, call.Nq, call.D, call.Dv
    acc = call.acc_dtype
    q4 = q.reshape(B, Hkv, G, Nq, D)
    do4 = dout.reshape(B, Hkv, G, Nq, Dv).to(acc)
    k32, v32 = k.to(acc), v.to(acc)
    # delta_i = sum_d dO·O (FlashAttention-2), minus the lse cotangent: d lse_i / d s_ij = p_ij.
    delta = (do4 * out.reshape(B, Hkv, G, Nq, Dv).to(acc)).sum(-1).view(B, Hq, Nq, 1)
    if dlse is not None:
        delta = delta - dlse.to(acc).unsqueeze(-1)
    lse_safe = lse.to(acc).masked_fill(lse == float("-inf"), float("inf")).unsqueeze(-1)   # exp(s - inf) = 0
    dq = torch.zeros(B, Hkv, G, Nq, D, dtype=acc, device=q.device)
    dk = torch.zeros(B, Hkv, call.Nk, D, dtype=acc, device=q.device)
    dv = torch.zeros(B, Hkv, call.Nk, Dv, dtype=acc, device=q.device)
    dbias = torch.zeros(call.bias.shape, dtype=acc, device=q.device) if need_dbias else None
    drop = call.dropout_p
    for i, runs in enumerate(sched):
        if not runs:
            continue
        q0, q1 = i * bq, min((i + 1) * bq, Nq)
        n = q1 - q0
        qb = (q4[..., q0:q1, :].to(acc) * call.scale).reshape(B, Hkv, G * n, D)
        dob = do4[..., q0:q1, :].reshape(B, Hkv, G * n, Dv)
        lb, db = lse_safe[:, :, q0:q1], delta[:, :, q0:q1]
        dqb = torch.zeros(B, Hkv, G * n, D, dtype=acc, device=q.device)
        for k0, k1, partial in runs:
            c = k1 - k0
            kc, vc = k32[:, :, k0:k1], v32[:, :, k0:k1]
            s_raw = torch.matmul(qb, kc.transpose(-1, -2)).view(B, Hq, n, c)
            s = call.scores(s_raw, q0, q1, k0, k1) if call.has_mods else s_raw
            if partial:
                s = s.masked_fill(~call.visible(q0, q1, k0, k1), float("-inf"))
            p = torch.exp(s - lb)
            dp = torch.matmul(dob, vc.transpose(-1, -2)).view(B, Hq, n, c)
            pd = p
            if drop:
                keep = call.keep(q0, q1, k0, k1) * (1.0 / (1.0 - drop))
                pd, dp = p * keep, dp * keep
            dv[:, :, k0:k1] += torch.matmul(pd.view(B, Hkv, G * n, c).transpose(-1, -2), dob)
            ds = dp.sub_(db).mul_(p)
            if call.has_mods:
                ds = call.scores_backward(s_raw, ds, q0, q1, k0, k1, dbias)
            ds = ds.reshape(B, Hkv, G * n, c)
            dqb += torch.matmul(ds, kc)
            dk[:, :, k0:k1] += torch.matmul(ds.transpose(-1, -2), qb)
        dq[..., q0:q1, :] = (dqb * call.scale).view(B, Hkv, G, n, D)
    return (dq.view(B, Hq, Nq, D).to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            None if dbias is None else dbias.to(call.bias.dtype))


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, call, bq, sched):
        out, lse = _fwd(call, q, k, v, bq, sched)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.bq, ctx.sched = call, bq, sched
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        need_dbias = call.bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = _bwd(call, q, k, v, out, lse, dout, dlse, ctx.bq, ctx.sched, need_dbias)
        if dbias is not None:
            dbias = dbias.sum_to_size(ctx.call_bias_shape) if hasattr(ctx, "call_bias_shape") else dbias
        return dq, dk, dv, dbias, None, None, None


def tiled_attention(call: Call, block_size: tuple[int, int] | None = None):
    """FlashAttention in torch ops. call: a validated Call (q: (B, Hq, Nq, D), k: (B, Hkv, Nk, D),
    v: (B, Hkv, Nk, Dv)). block_size: (BQ, BK), default the BlockMask's own or (BLOCK_Q, BLOCK_K).
    Returns out (B, Hq, Nq, Dv) in q's dtype and lse (B, Hq, Nq) float32; differentiable in q, k, v, bias."""
    bm = call.block_mask
    bq, bk = block_size or (bm.block_size if bm is not None else (BLOCK_Q, BLOCK_K))
    sched = _schedule(call, bq, bk)
    return _TiledAttention.apply(call.q, call.k, call.v, call.bias, call, bq, sched)
