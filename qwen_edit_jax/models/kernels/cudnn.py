"""cuDNN flash attention (NVIDIA GPUs) through `jax.nn.dot_product_attention`."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def valid_keys_first(k: jax.Array, v: jax.Array, key_mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Reorder keys/values so each sample's valid keys come first, and count them.

    Attention is invariant to the order of keys, so a key mask becomes per-sample key lengths,
    which flash kernels take directly (cuDNN rejects a broadcast [B,1,1,S] mask).
    """
    order = jnp.argsort(~key_mask, axis=1, stable=True)
    take = lambda t: jnp.take_along_axis(t, order[:, :, None, None], axis=1)  # noqa: E731
    return take(k), take(v), jnp.sum(key_mask, axis=1, dtype=jnp.int32)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    """cuDNN flash attention (NVIDIA GPUs, bf16/fp16 inputs) via `jax.nn.dot_product_attention`."""
    if key_mask is None:
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    k, v, kv_len = valid_keys_first(k, v, key_mask)
    q_len = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, query_seq_lengths=q_len, key_value_seq_lengths=kv_len,
                                        implementation="cudnn")
