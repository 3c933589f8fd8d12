"""Blocked online-softmax ("flash") attention in plain JAX, with a recomputing custom VJP.

Works on any backend. The scores exist one `[block_h, block_q, block_k]` tile at a time (heads of
all samples taken `block_h` at a time), and the backward keeps only q, k, v, the output and the
row log-sum-exp from the forward, recomputing each tile's probabilities (FlashAttention-2). On
XLA:CPU it is also faster than `xla_attention`, whose `[B, H, S, S]` fp32 scores are streamed
through DRAM by every elementwise pass.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32
MASKED = float(jnp.finfo(F32).min)  # logit of a masked key: the same fill as `xla_attention`
# Default tile, chosen on XLA:CPU with benchmarks/attention.py: one head at a time and ~1k × 1k scores
# per step. Other backends take all heads per tile (parallelism over heads; not tuned there).
BLOCK_H, BLOCK_Q, BLOCK_K = 1, 1088, 1088


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, *,
                    block_q: int | None = None, block_k: int | None = None,
                    block_h: int | None = None) -> jax.Array:
    """SDPA (scale 1/√d) over q `[B, Sq, H, d]`, k, v `[B, Sk, H, d]`; `key_mask` `[B, Sk]` (True = attend).

    Equal to `xla_attention` (fp32 statistics, output in q's dtype), including a sample whose keys
    are all masked: like `xla_attention`'s finfo.min fill it gets the uniform average of its values
    (and no gradient into q or k). Lengths need not divide the blocks: keys are padded and masked.
    `block_h` heads (of the B·H) are processed at a time, `block_q` × `block_k` scores per head.
    """
    b, sq, h, d = q.shape
    sk = k.shape[1]
    bq, bk = _block(sq, block_q or BLOCK_Q), _block(sk, block_k or BLOCK_K)
    bh_max = block_h or (BLOCK_H if jax.default_backend() == "cpu" else b * h)
    bh = max(n for n in range(1, min(b * h, bh_max) + 1) if b * h % n == 0)  # divides B·H
    scale = 1.0 / math.sqrt(d)
    if q.dtype == F32 or math.log2(scale).is_integer():  # exact enough: fold the scale into q
        q, scale = q * jnp.asarray(scale, q.dtype), 1.0
    if key_mask is not None:  # a sample without keys: xla's fill makes all logits equal; so does q = 0
        has_key = jnp.any(key_mask, axis=1)
        q = jnp.where(has_key[:, None, None, None], q, jnp.zeros((), q.dtype))
        key_mask = key_mask | ~has_key[:, None]
    if sk % bk and key_mask is None:
        key_mask = jnp.ones((b, sk), bool)
    ms = None  # per-key logit bias: 0 to attend, MASKED to mask
    if key_mask is not None:
        key_mask = jnp.pad(key_mask, ((0, 0), (0, -sk % bk)))  # padded keys are masked
        bias = jnp.where(key_mask, 0.0, MASKED).astype(F32)
        ms = _to_blocks(jnp.broadcast_to(bias[:, :, None, None], (b, bias.shape[1], h, 1)), bk, bh)[..., 0]
    out = _flash(_to_blocks(q, bq, bh), _to_blocks(k, bk, bh), _to_blocks(v, bk, bh), ms, scale)
    return _from_blocks(out, b, h, sq).astype(q.dtype)


def _block(s: int, target: int) -> int:
    """Block length for `s`: `s` itself if ≤ `target`, else the largest multiple-of-8 divisor in
    (target/2, target], else a multiple of 8 covering `s` in ⌈s/target⌉ blocks with least padding."""
    if s <= target:
        return s
    fits = [n for n in range(target // 8 * 8, target // 2, -8) if s % n == 0]
    return fits[0] if fits else _cdiv(_cdiv(s, _cdiv(s, target)), 8) * 8


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _to_blocks(x: jax.Array, blk: int, bh: int) -> jax.Array:
    """`[B, S, H, d]` → `[B·H/bh, S/blk, bh, blk, d]` tiles, zero-padded to a multiple of `blk`."""
    b, s, h, d = x.shape
    x = jnp.pad(x, ((0, 0), (0, -s % blk), (0, 0), (0, 0)))
    return x.transpose(0, 2, 1, 3).reshape(b * h // bh, bh, -1, blk, d).swapaxes(1, 2)


def _from_blocks(x: jax.Array, b: int, h: int, s: int) -> jax.Array:
    """Inverse of `_to_blocks`, cut to length `s`."""
    d = x.shape[-1]
    return x.swapaxes(1, 2).reshape(b, h, -1, d)[:, :, :s].transpose(0, 2, 1, 3)


def _scan(f: Callable, init, xs):
    """`lax.scan`, without the loop for a single block."""
    if jax.tree.leaves(xs)[0].shape[0] > 1:
        return jax.lax.scan(f, init, xs)
    carry, y = f(init, jax.tree.map(lambda x: x[0], xs))
    return carry, jax.tree.map(lambda t: t[None], y)


def _map(f: Callable, xs):
    """`lax.map` over the leading axis, without the loop for a single entry."""
    return _scan(lambda _, x: (None, f(x)), None, xs)[1]


def _dot(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum(spec, a, b, preferred_element_type=F32)


def _masked(s: jax.Array, bias: jax.Array | None, key_axis: int) -> jax.Array:
    """Logits plus the key bias (`bias` `[bh, bk]`: 0, or `MASKED` for a masked key; keys on
    `key_axis` of the tile `s`). `s + MASKED` rounds to `MASKED` for any finite logit below 1e31 in
    size, so this equals `xla_attention`'s fill (a select before; XLA:CPU runs either as its own pass)."""
    if bias is None:
        return s
    return s + (bias[:, None, :] if key_axis == 2 else bias[:, :, None])


def _fwd_rows(q: Array, ks: Array, vs: Array, ms: Array | None, scale: float) -> tuple[Array, Array]:
    """One query tile `[bh, bq, d]` against all key tiles, online softmax: (out fp32, logsumexp)."""
    def step(carry, kvm):
        m, l, acc = carry
        k, v, mask = kvm
        s = _masked(_dot("hqd,hkd->hqk", q, k) * scale, mask, 2)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        pv = _dot("hqk,hkd->hqd", p.astype(v.dtype), v)
        return (m_new, l * alpha + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv), None

    rows = q.shape[:-1]
    init = (jnp.full(rows, MASKED, F32), jnp.zeros(rows, F32), jnp.zeros(q.shape, F32))
    (m, l, acc), _ = _scan(step, init, (ks, vs, ms))
    return acc / l[..., None], m + jnp.log(l)


def _fwd_group(qs: Array, ks: Array, vs: Array, ms: Array | None, scale: float) -> tuple[Array, Array]:
    """Forward of one head group: qs `[nq, bh, bq, d]`, ks/vs `[nk, bh, bk, d]`, ms `[nk, bh, bk]` | None."""
    return _map(lambda q: _fwd_rows(q, ks, vs, ms, scale), qs)


def _bwd_group(qs: Array, ks: Array, vs: Array, ms: Array | None, out: Array, lse: Array, dos: Array,
               scale: float) -> tuple[Array, Array, Array]:
    """FlashAttention-2 backward of one head group: per key tile and query tile, recompute p = exp(s − lse).

    Tiles are computed transposed ([keys, queries]) so that dv = pᵀ·dO and dk = dsᵀ·q are plain
    matmuls (on XLA:CPU a transposed left operand costs ~1.5×), and dqᵀ = kᵀ·dsᵀ is one too.
    """
    delta = jnp.sum(dos.astype(F32) * out.astype(F32), axis=-1)  # D = rowsum(dO ∘ O)

    def key_block(dqt, kvm):
        k, v, mask = kvm
        kt = jnp.swapaxes(k, -1, -2)  # [bh, d, bk]

        def query_block(carry, xs):
            dk, dv = carry
            q, do, lse_i, delta_i = xs
            pt = jnp.exp(_masked(_dot("hkd,hqd->hkq", k, q) * scale, mask, 1) - lse_i[:, None, :])
            dv = dv + _dot("hkq,hqd->hkd", pt.astype(do.dtype), do)
            dpt = _dot("hkd,hqd->hkq", v, do)
            dst = (pt * (dpt - delta_i[:, None, :]) * scale).astype(q.dtype)
            dk = dk + _dot("hkq,hqd->hkd", dst, q)
            return (dk, dv), _dot("hdk,hkq->hdq", kt, dst)

        zeros = jnp.zeros(k.shape, F32)
        (dk, dv), dqt_j = _scan(query_block, (zeros, zeros), (qs, dos, lse, delta))
        return dqt + dqt_j, (dk, dv)

    nq, bh, bq, d = qs.shape
    dqt, (dk, dv) = _scan(key_block, jnp.zeros((nq, bh, d, bq), F32), (ks, vs, ms))
    return jnp.swapaxes(dqt, -1, -2).astype(qs.dtype), dk.astype(ks.dtype), dv.astype(vs.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(qs: Array, ks: Array, vs: Array, ms: Array | None, scale: float) -> Array:
    """Attention on tiles `[groups, n, bh, blk, d]` (`ms` `[groups, nk, bh, bk]` | None), group by group."""
    return _flash_fwd(qs, ks, vs, ms, scale)[0]


def _flash_fwd(qs: Array, ks: Array, vs: Array, ms: Array | None, scale: float) -> tuple[Array, tuple]:
    out, lse = _map(lambda x: _fwd_group(*x, scale), (qs, ks, vs, ms))
    out = out.astype(qs.dtype)
    return out, (qs, ks, vs, ms, out, lse)


def _flash_bwd(scale: float, res: tuple, dos: Array) -> tuple[Array, Array, Array, None]:
    dq, dk, dv = _map(lambda x: _bwd_group(*x, scale), (*res, dos))
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)
