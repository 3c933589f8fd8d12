"""VAE checks on 8 simulated CPU devices; run as a subprocess by tests/test_vae_loading.py.

`XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/vae_sharding_worker.py` (the flag
must be set before jax is imported). Compares sharded encode/decode with diffusers, checks that the
weights are replicated and how the batch was split; prints one line `RESULT {...}`, never asserts.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qwen_edit_jax.loading.vae import vae_from_tensors  # noqa: E402
from qwen_edit_jax.models.vae import VAEConfig  # noqa: E402
from qwen_edit_jax.parallel import is_sharded, make_mesh  # noqa: E402
from tests.compare import rel_err  # noqa: E402
from tests.vae_reference import TINY_CONFIGS, numpy_state, torch_decode, torch_encode, torch_vae  # noqa: E402

CFG = TINY_CONFIGS["three_levels"]
# (data, fsdp, tensor), batch, how many ways the batch should be split:
# 8 over data × fsdp = 4 ways; 6 over data only (fsdp's 4 does not divide 6); 3 not at all.
CASES = [((2, 2, 2), 8, 4), ((2, 4, 1), 6, 2), ((1, 8, 1), 3, 1)]


def main() -> dict:
    assert jax.device_count() == 8, jax.devices()
    ref = torch_vae(CFG, seed=2)
    state = numpy_state(ref)
    rng = np.random.default_rng(0)
    out = []
    for mesh_shape, batch, split in CASES:
        mesh = make_mesh(*mesh_shape)
        vae = vae_from_tensors(state, VAEConfig(**CFG), dtype=jnp.float32, mesh=mesh)
        x = rng.uniform(-1, 1, (batch, 3, 16, 24)).astype(np.float32)
        z = rng.standard_normal((batch, 4, 2, 3)).astype(np.float32)
        lat, img = vae.encode(x), vae.decode(z)
        params = jax.tree.leaves(nnx.state(vae.model))
        out.append({
            "mesh": mesh_shape, "batch": batch, "expect_split": split,
            "enc_err": rel_err(lat, torch_encode(ref, x)), "dec_err": rel_err(img, torch_decode(ref, z)),
            "params_replicated": all(not is_sharded(p) and len(p.sharding.device_set) == 8 for p in params),
            "out_split": batch // lat.addressable_shards[0].data.shape[0] if is_sharded(lat) else 1,
            "dec_split": batch // img.addressable_shards[0].data.shape[0] if is_sharded(img) else 1,
        })
    return {"ok": True, "cases": out}


if __name__ == "__main__":
    try:
        result = main()
    except Exception as e:  # report, the test asserts
        result = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"}
    print("RESULT " + json.dumps(result))
