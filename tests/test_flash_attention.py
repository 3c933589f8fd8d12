"""The 'flash' kernel (blocked online softmax, recomputing custom VJP) against the 'xla' reference:
values and gradients w.r.t. q, k, v under `jax.jit`, with and without key masks, odd lengths,
Sq ≠ Sk, bf16 inputs, and inside `jax.checkpoint` + `lax.scan` as the model runs it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen_edit_jax.models.kernels.flash import _block, flash_attention
from qwen_edit_jax.models.kernels.xla import xla_attention
from tests.compare import assert_close, rel_err

# fp32 tolerances ≈ 10× the error measured on 2026-12-07 (2-core CPU; tests/compare.py says how to re-measure).
TOL = 2e-5  # flash vs xla, output and gradients: measured ≤ 1.5e-6 over CASES
REMAT_TOL = 5e-6  # measured 4.2e-7
XLA_TOL = 4e-6  # xla_attention vs a plain softmax attention, output and gradients: measured ≤ 3.7e-7
BF16_TOL = 1.6e-2  # bf16 vs fp32: measured ≤ 3.1e-3, 5× (bf16 eps 7.8e-3; the check against xla's own bf16 error
#                    below is the sharper one)


def inputs(seed: int, b: int, sq: int, sk: int, h: int, d: int, dtype=np.float32):
    rng = np.random.default_rng(seed)
    q = 2.0 * rng.standard_normal((b, sq, h, d))  # sharper softmax: the online rescaling matters
    k, v = (rng.standard_normal((b, sk, h, d)) for _ in range(2))
    ct = rng.standard_normal((b, sq, h, d))  # random cotangent for the VJP
    return [jnp.asarray(t, dtype) for t in (q, k, v, ct)]


@jax.jit
def xla_vjp(q, k, v, ct, mask):
    out, vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, mask), q, k, v)
    return out, vjp(ct)


def flash_vjp(q, k, v, ct, mask, block_q=None, block_k=None):
    @jax.jit
    def run(q, k, v, ct, mask):
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, mask, block_q=block_q, block_k=block_k), q, k, v)
        return out, vjp(ct)

    return run(q, k, v, ct, mask)


def masks(kind: str, b: int, sk: int) -> np.ndarray | None:
    rng = np.random.default_rng(7)
    if kind == "none":
        return None
    m = rng.random((b, sk)) < 0.6
    if kind == "one_valid":  # sample 0 attends to a single key in the middle
        m[0] = False
        m[0, sk // 2] = True
    elif kind == "middle":  # a run of masked keys in the middle (e.g. padded text between streams)
        m[:] = True
        m[:, sk // 3: 2 * sk // 3] = False
    elif kind == "all_masked":  # sample 0 has no key at all: xla gives the uniform average
        m[0] = False
    return m


CASES = [  # (b, sq, sk, h, d, mask kind, block_q, block_k)
    (2, 37, 37, 2, 16, "none", 16, 16),  # odd length: padded q and k blocks (padding keys masked)
    (2, 300, 300, 2, 32, "one_valid", 128, 48),
    (2, 100, 300, 2, 16, "middle", 32, 64),  # Sq < Sk
    (2, 300, 37, 2, 16, "all_masked", 64, 8),  # Sq > Sk
    (1, 1, 1, 2, 8, "none", None, None),  # S = 1
    (2, 1, 37, 2, 8, "random", None, 16),
    (2, 300, 300, 2, 32, "random", None, None),  # default blocks
]


@pytest.mark.parametrize("b,sq,sk,h,d,kind,block_q,block_k", CASES)
def test_matches_xla(b, sq, sk, h, d, kind, block_q, block_k):
    q, k, v, ct = inputs(0, b, sq, sk, h, d)
    mask = masks(kind, b, sk)
    ref_out, ref_grads = xla_vjp(q, k, v, ct, mask)
    out, grads = flash_vjp(q, k, v, ct, mask, block_q, block_k)
    assert out.shape == q.shape and out.dtype == q.dtype
    for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref_out, *ref_grads)):
        assert np.all(np.isfinite(np.asarray(got))), name
        assert_close(got, want, TOL, f"flash vs xla {name}")


def test_bf16_within_xla_error():
    """bf16 inputs: both kernels are compared with the fp32 reference. Measured errors are 2–6e-3
    (bf16 has 8 mantissa bits, eps 7.8e-3); flash's gradients are up to 2.5× xla's because it rounds
    dS to bf16 for the dq/dk matmuls (as FlashAttention does), so: ≤ 1.6e-2 and ≤ 3× xla's + 1e-3."""
    q, k, v, ct = (np.asarray(t, np.float32) for t in inputs(1, 2, 300, 300, 2, 32, jnp.bfloat16))
    mask = masks("random", 2, 300)
    ref = jax.tree.map(np.asarray, xla_vjp(q, k, v, ct, mask))
    bf = [jnp.asarray(t, jnp.bfloat16) for t in (q, k, v, ct)]
    xla = xla_vjp(*bf, mask)
    flash = flash_vjp(*bf, mask, 128, 64)
    assert flash[0].dtype == jnp.bfloat16
    for r, x, f in zip(jax.tree.leaves(ref), jax.tree.leaves(xla), jax.tree.leaves(flash)):
        assert_close(f, r, BF16_TOL, "bf16 flash vs fp32 xla")
        assert rel_err(f, r) < 3 * rel_err(x, r) + 1e-3, (rel_err(f, r), rel_err(x, r))


def test_remat_scan_like_the_model():
    """Layers under `lax.scan` with `jax.checkpoint` bodies (the model's remat): same gradients."""
    rng = np.random.default_rng(3)
    b, s, h, d, layers = 2, 75, 2, 16, 2
    x0 = jnp.asarray(rng.standard_normal((b, s, h * d)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((layers, h * d, 3, h * d)) / np.sqrt(h * d), jnp.float32)
    mask = jnp.asarray(masks("random", b, s))

    def loss(w, x, attention):
        def body(x, wl):
            q, k, v = (jnp.einsum("bse,ef->bsf", x, wl[:, i]).reshape(b, s, h, d) for i in range(3))
            return x + attention(q, k, v, mask).reshape(b, s, h * d), None

        x, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), x, w)
        return jnp.sum(x * x)

    flash = lambda q, k, v, m: flash_attention(q, k, v, m, block_q=32, block_k=16)  # noqa: E731
    gw, gx = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(w, x0, flash)
    rw, rx = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(w, x0, xla_attention)
    assert_close(gw, rw, REMAT_TOL, "remat scan, weight gradient")
    assert_close(gx, rx, REMAT_TOL, "remat scan, input gradient")


def test_block_choice():
    assert _block(300, 512) == 300  # one block
    assert _block(2176, 512) == 272  # prefers a divisor (no padding, no mask) in (target/2, target]
    assert _block(4352, 1024) == 544
    assert _block(1001, 256) == 256  # no divisor: ⌈1001/256⌉ = 4 blocks of 256 (23 padded keys)
    assert _block(37, 16) == 16


def test_registered_and_auto_picks_flash_on_cpu():
    """`flash` is selectable by name, and `auto` (the default) runs it on CPU, cuDNN/splash elsewhere."""
    from qwen_edit_jax.config import ModelOptions
    from qwen_edit_jax.models.kernels import auto_kernel_name, get_attention

    assert get_attention("flash") is flash_attention
    assert ModelOptions().attention == "auto"
    assert auto_kernel_name(jnp.float32, 128) == "flash"
    # on GPUs cuDNN's flash kernel needs compute capability ≥ 8.0: a T4 (7.5) runs flash
    from types import SimpleNamespace

    from qwen_edit_jax.models.kernels import cudnn_flash_capable

    assert cudnn_flash_capable(SimpleNamespace(compute_capability="8.0"))
    assert cudnn_flash_capable(SimpleNamespace(compute_capability="9.0"))
    assert not cudnn_flash_capable(SimpleNamespace(compute_capability="7.5"))
    assert cudnn_flash_capable(jax.devices()[0])  # CPU devices report none (and never reach the GPU branch)
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 40, 3, 16)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(40)[None, :] < np.array([[40], [25]]))
    auto = get_attention("auto")(q, k, v, mask)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(flash_attention(q, k, v, mask)))


def test_xla_closed_form_backward_equals_autodiff():
    """`xla_attention`'s hand-written VJP against autodiff of a plain softmax attention written here,
    with a fully masked sample (its logits are constants: no gradient into q or k)."""
    def plain(q, k, v, mask):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        s = jnp.where(mask[:, None, None, :], s, jnp.finfo(jnp.float32).min)
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v)

    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 33, 2, 8)), jnp.float32) for _ in range(3))
    mask = jnp.asarray(np.arange(33)[None, :] < np.array([[33], [20], [0]]))
    ct = jnp.asarray(rng.standard_normal((3, 33, 2, 8)), jnp.float32)
    out, vjp = jax.vjp(lambda *a: xla_attention(*a, mask), q, k, v)
    ref_out, ref_vjp = jax.vjp(lambda *a: plain(*a, mask), q, k, v)
    assert_close(out, ref_out, XLA_TOL, "xla vs plain attention")
    for name, g, r in zip("qkv", vjp(ct), ref_vjp(ct)):
        assert_close(g, r, XLA_TOL, f"xla closed-form d{name} vs autodiff")
