"""Pallas splash attention (TPU flash attention) as the 'splash' kernel, sharded with `jax.shard_map`.

At 1024² edit resolution one joint sequence is ~8.4k tokens; materialised fp32 scores would be
24 × 8448² × 4 B = 6.9 GB per sample per layer. Splash attention streams key blocks through VMEM
with an online softmax and never forms them (forward and a fused backward kernel).

- Layout: the model's q, k, v `[B, S, H, d]` become `[H, S, d]` per sample (vmap over B); q is
  pre-scaled by 1/√d (the kernel does not scale).
- Padding: S is padded to a multiple of 128 (the TPU block granularity). Text padding and block
  padding are expressed with `SegmentIds` (a token attends to keys of its own segment): real
  queries are segment 1 and see only valid keys (segment 1); masked text keys and padded tokens are
  segment 0, so padded queries always have keys to attend (no empty softmax rows) and their
  outputs are sliced off.
- Sharding: Mosaic kernels cannot be auto-partitioned, so under a mesh (`jax.set_mesh`) the call
  is wrapped in `jax.shard_map` with batch over data × fsdp and heads over tensor — no
  communication; each device runs the kernel on its own samples and heads.
- Off TPU (CPU tests) the same kernel runs in Pallas interpret mode; on TPU it is compiled.

`models.kernels.get_attention('splash')` imports this module on first use; it needs no TPU.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from ...parallel.mesh import batch_axes_for, current_mesh
from .platform import platform_of

F32 = jnp.float32
LANE = 128  # splash block sizes are multiples of 128 on TPU


def padded_length(s: int) -> int:
    return -(-s // LANE) * LANE


# Block-size targets per TPU generation (device_kind): (block_q, block_kv, block_kv_compute, block_q_dkv,
# block_kv_dkv, block_kv_dkv_compute), each fitted down to a divisor of the padded length. Chosen by
# benchmarks/splash_blocks.py: AOT compiles (libtpu) of the 1024² edit's splash forward + fused backward
# (24 heads × 8448 × 128 per chip) ranked by a roofline + grid-step model (XLA's cost analysis gives the
# Mosaic kernels no time). 1408 = 8448 / 6 wins on v5e and v6e: 30× fewer grid steps than 256, a fifth of
# the kernels' HBM traffic, attention temporaries 549 vs 1886 MiB; 2048² blocks overflow v5e's VMEM.
# Unlisted kinds (and CPU) use DEFAULT_TARGETS.
BLOCK_TARGETS: dict[str, tuple[int, ...]] = {
    "TPU v5 lite": (1408,) * 6,
    "TPU v6 lite": (1408,) * 6,
}
DEFAULT_TARGETS: tuple[int, ...] = (512,) * 6


def fit_block(target: int, n: int) -> int:
    """Largest multiple of 128 that is ≤ `target` and divides `n` (a multiple of 128): no extra padding."""
    return next(b for b in range(max(LANE, target // LANE * LANE), 0, -LANE) if n % b == 0)


def block_sizes(sp: int, device_kind: str | None = None) -> sa.BlockSizes:
    """Splash block sizes for padded length `sp` on `device_kind`: the table's targets fitted to `sp`."""
    bq, bkv, bkvc, bqd, bkvd, bkvdc = BLOCK_TARGETS.get(device_kind or "", DEFAULT_TARGETS)
    bkv, bkvd = fit_block(bkv, sp), fit_block(bkvd, sp)
    return sa.BlockSizes(block_q=fit_block(bq, sp), block_kv=bkv, block_kv_compute=fit_block(bkvc, bkv),
                         block_q_dkv=fit_block(bqd, sp), block_kv_dkv=bkvd,
                         block_kv_dkv_compute=fit_block(bkvdc, bkvd), use_fused_bwd_kernel=True)


def _kernel(sp: int, heads: int, interpret: bool, sizes: sa.BlockSizes):
    """A splash MHA kernel for `heads` heads over a padded length `sp`, full (unmasked) attention.

    Built inside the trace that uses it (its block-mask tables become constants of that program),
    so nothing traced is cached across jits; the mask processing itself is cached by splash.
    """
    mask = sa.MultiHeadMask([sa.FullMask((sp, sp))] * heads)
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def segment_ids(batch: int, s: int, sp: int, key_mask: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """(q ids, kv ids) `[B, sp]` int32: 1 = real query / valid key, 0 = block padding / masked key."""
    real = jnp.arange(sp) < s
    q_ids = jnp.broadcast_to(real, (batch, sp)).astype(jnp.int32)
    valid = jnp.broadcast_to(real, (batch, sp))
    if key_mask is not None:
        valid = valid & jnp.pad(key_mask.astype(bool), ((0, 0), (0, sp - s)))
    return q_ids, valid.astype(jnp.int32)


def _mesh_specs(mesh, batch: int, heads: int) -> tuple[P, P, int]:
    """(q/k/v/out spec `[B, H, S, d]`, segment-id spec `[B, S]`, local head count)."""
    axes = batch_axes_for(mesh, batch)
    b = None if not axes else axes[0] if len(axes) == 1 else axes
    t = dict(mesh.shape).get("tensor", 1)
    h = "tensor" if t > 1 and heads % t == 0 else None
    return P(b, h, None, None), P(b, None), heads // (t if h else 1)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, *,
                     sizes: sa.BlockSizes | None = None) -> jax.Array:
    """Splash attention with the standard kernel signature (`[B, S, H, d]`, key mask `[B, S]`);
    `sizes` overrides the per-generation block sizes (benchmarks/splash_blocks.py)."""
    bsz, s, heads, d = q.shape
    sp = padded_length(s)
    scale = 1.0 / math.sqrt(d)
    pad = ((0, 0), (0, 0), (0, sp - s), (0, 0))
    to_bhsd = lambda t: jnp.pad(jnp.swapaxes(t, 1, 2), pad)  # noqa: E731
    qh = to_bhsd((q.astype(F32) * scale).astype(q.dtype))
    kh, vh = to_bhsd(k), to_bhsd(v)
    q_ids, kv_ids = segment_ids(bsz, s, sp, key_mask)
    mesh = current_mesh()
    platform = platform_of(mesh)
    if platform in ("gpu", "cuda", "rocm"):
        raise ValueError("attention='splash' is the TPU (Pallas Mosaic) kernel; on NVIDIA GPUs use attention='cudnn'")
    interpret = platform != "tpu"  # CPU: Pallas interpret mode (tests)
    kind = getattr(getattr(mesh, "abstract_device", None), "device_kind", None) if mesh is not None else None
    sizes = sizes or block_sizes(sp, kind or jax.devices()[0].device_kind)

    def local(qh, kh, vh, q_ids, kv_ids):
        kernel = _kernel(sp, qh.shape[1], interpret, sizes)
        one = lambda q1, k1, v1, qi, ki: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=qi, kv=ki))  # noqa: E731
        return jax.vmap(one)(qh, kh, vh, q_ids, kv_ids)

    if mesh is None:
        out = local(qh, kh, vh, q_ids, kv_ids)
    else:
        spec, ids_spec, _ = _mesh_specs(mesh, bsz, heads)
        out = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, ids_spec, ids_spec), out_specs=spec,
                            check_vma=False)(qh, kh, vh, q_ids, kv_ids)
    return jnp.swapaxes(out[:, :, :s], 1, 2).astype(q.dtype)
