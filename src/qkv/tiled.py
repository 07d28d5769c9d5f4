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

__all__ = ["tiled_attention", "BLOCK_Q", "BLOCK_K", "TILE_BYTES"]

BLOCK_Q = 128            # query rows per step
BLOCK_K = 128            # kv tile (the granularity at which masks are skipped)
TILE_BYTES = 32 * 2**20  # most bytes of one temporary score tile (B·Hq·BLOCK_Q·keys): bounds the memory
MIN_FULL = 4             # shorter stretches of full tiles are masked along with their partial neighbours


def _schedule(call: Call, bq: int, bk: int):
    """Per query block, the kv runs to visit: a list of (k0, k1, partial), each run a whole number of kv
    tiles of one kind (full or partial) whose score tile fits in TILE_BYTES."""
    Nq, Nk = call.Nq, call.Nk
    nqb, nkb = -(-Nq // bq), -(-Nk // bk)
    row_bytes = call.B * call.Hq * bq * torch.empty((), dtype=call.acc_dtype).element_size()
    per_run = max(1, TILE_BYTES // (row_bytes * bk))           # kv tiles per fused matmul
    state = call.block_state(bq, bk)
    if state is None:
        step = per_run * bk
        runs = [(k0, min(k0 + step, Nk), False) for k0 in range(0, Nk, step)]
        return [runs] * nqb
    st = state.reshape(-1, nqb, nkb)
    visit = (st > 0).any(0).tolist()
    full = (st == 2).all(0).tolist()
    sched = []
    for i in range(nqb):
        # Mark each visited tile masked (P) or not (F); a stretch of fewer than MIN_FULL full tiles is cheaper
        # masked inside its neighbours' run than as runs of its own (fewer, larger ops).
        marks = [None if not visit[i][j] else ("F" if full[i][j] else "P") for j in range(nkb)]
        j = 0
        while j < nkb:
            if marks[j] == "F":
                j1 = j
                while j1 < nkb and marks[j1] == "F":
                    j1 += 1
                if j1 - j < MIN_FULL and ((j > 0 and marks[j - 1]) or (j1 < nkb and marks[j1])):
                    marks[j:j1] = ["P"] * (j1 - j)
                j = j1
            else:
                j += 1
        runs, j = [], 0
        while j < nkb:
            if marks[j] is None:
                j += 1
                continue
            j0 = j
            while j < nkb and marks[j] == marks[j0] and j - j0 < per_run:
                j += 1
            runs.append((j0 * bk, min(j * bk, Nk), marks[j0] == "P"))
        sched.append(runs)
    return sched


def _lse_merge(lse_a, o_a, lse_b, o_b):
    """Merge two softmax-normalised partial results over disjoint key sets by their logsumexps.
    lse: (..., n, 1); o: (..., n, Dv) (broadcast views). A side with lse = -inf contributes nothing."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(lse == float("-inf"), 0.0)
    return lse, o_a * torch.exp(lse_a - safe) + o_b * torch.exp(lse_b - safe)


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
        lse_i = o = None
        for k0, k1, partial in runs:
            # One fused softmax per run (each row stays in cache), its lse from the row max: 2 sweeps of the
            # score tile instead of the 4 of max / subtract / exp / sum; runs are merged by their lse.
            s = torch.matmul(qb, k32[:, :, k0:k1].transpose(-1, -2)).view(B, Hq, n, k1 - k0)
            if call.has_mods:
                s = call.scores(s, q0, q1, k0, k1)
            if partial:
                s = s.masked_fill_(~call.visible(q0, q1, k0, k1), float("-inf"))
            m, arg = s.max(-1, keepdim=True)
            p = torch.softmax(s, -1)
            lse_c = m - torch.log(p.gather(-1, arg))
            if partial:
                dead = m == float("-inf")                      # rows with no visible key in this run
                if bool(dead.any()):
                    p = p.masked_fill_(dead, 0.0)
                    lse_c = lse_c.masked_fill_(dead, float("-inf"))
            if drop:
                p = p.mul_(call.keep(q0, q1, k0, k1)).mul_(1.0 / (1.0 - drop))
            pv = torch.matmul(p.view(B, Hkv, G * n, k1 - k0), v32[:, :, k0:k1]).view(B, Hq, n, Dv)
            if o is None:
                lse_i, o = lse_c, pv
            else:
                lse_i, o = _lse_merge(lse_i, o, lse_c, pv)
        out[..., q0:q1, :] = o.view(B, Hkv, G, n, Dv)
        lse[..., q0:q1] = lse_i.squeeze(-1)
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
            if s is s_raw and call.has_mods:
                s = s.clone()                                  # s_raw is read again by scores_backward
            if partial:
                s = s.masked_fill_(~call.visible(q0, q1, k0, k1), float("-inf"))
            p = s.sub_(lb).exp_()
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
