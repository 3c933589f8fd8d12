"""One process of a multi-host LoRA training run on localhost; launched by tests/test_sharding_multihost.py.

`python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT OUT_DIR`, with
`XLA_FLAGS=--xla_force_host_platform_device_count=<8 / NUM_PROCESSES>` set by the caller. With
NUM_PROCESSES > 1 the processes meet through `jax.distributed` (coordinator on localhost:PORT) and
together own the 8 devices of one (data 2, fsdp 2, tensor 2) mesh. Each process loads only its
devices' weight shards (`load_transformer(mesh=)`), feeds only its own batch rows, trains 3 steps
of the real LoRA step, then every process takes part in an Orbax checkpoint save and restore.
Prints `RESULT {...}` (losses, a parameter digest, restore check); never asserts itself.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    pid, nproc, port, ckpt, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    from qwen_edit_jax import distributed

    started = distributed.initialize(f"localhost:{port}" if nproc > 1 else None, nproc if nproc > 1 else None,
                                     pid if nproc > 1 else None, initialization_timeout=120)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import qwen_edit_jax as q
    from qwen_edit_jax import sharding as shd
    from qwen_edit_jax.config import LoraConfig, ModelOptions
    from qwen_edit_jax.training.checkpoint import TrainCheckpointer
    from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
    from qwen_edit_jax.training.step import make_optimizer, make_train_step, split_lora

    mesh = shd.make_mesh(2, 2, 2)
    model = q.load_transformer(ckpt, mesh=mesh, options=ModelOptions(lora=LoraConfig(rank=4)))
    graphdef, params, base = split_lora(model)
    tx, _ = make_optimizer(OptimSection(learning_rate=1e-2, eps=1e-3), max_steps=10)  # eps: see sharding_worker
    opt = shd.init_opt_state(tx, params, mesh)
    global_batch = 8
    step = make_train_step(graphdef, tx, ObjectiveSection(), mesh=mesh, global_batch=global_batch)
    rows = distributed.local_batch_rows(shd.batch_sharding(mesh, global_batch), global_batch)
    cfg = q.preset("tiny")
    img_shapes = [(1, 4, 4), (1, 2, 6)]
    losses = []
    for i in range(3):
        rng = np.random.default_rng(i)  # the same global batch on every host; each keeps its rows
        full = {
            "target": rng.standard_normal((1, global_batch, 16, cfg.in_channels)).astype(np.float32),
            "references": rng.standard_normal((1, global_batch, 12, cfg.in_channels)).astype(np.float32),
            "prompt_embeds": rng.standard_normal((1, global_batch, 9, cfg.joint_attention_dim)).astype(np.float32),
            "prompt_mask": np.arange(9)[None, None, :] < rng.integers(5, 10, (1, global_batch, 1)),
        }
        local = {k: v[:, rows] for k, v in full.items()}
        params, opt, metrics = step(params, opt, base, img_shapes, local, jax.random.key(0), i)
        losses.append(float(metrics["loss"]))

    digest = float(jax.jit(lambda t: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))(params))
    ck = TrainCheckpointer(out_dir, keep=1, async_save=True)
    ck.save(3, params, opt, {"step": 3})
    ck.wait()
    restored, _, meta = ck.restore(3, params, opt)
    def all_equal(a, b):
        return jnp.all(jnp.array([jnp.all(x == y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))

    same = bool(jax.jit(all_equal)(restored, params))
    ck.close()
    leaf = params["transformer_blocks"]["attn"]["to_qkv"]["lora_A"]
    print("RESULT " + json.dumps({
        "ok": True, "process": jax.process_index(), "processes": jax.process_count(), "distributed": started,
        "devices": jax.device_count(), "local_devices": jax.local_device_count(), "rows": rows.tolist(),
        "losses": losses, "digest": digest, "restored_equal": same, "meta": meta,
        "restored_sharding": str(restored["transformer_blocks"]["attn"]["to_qkv"]["lora_A"].sharding.spec),
        "lora_a_local_shards": len(leaf.addressable_shards),
    }), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        print("RESULT " + json.dumps({"ok": False, "error": traceback.format_exc()}), flush=True)
        sys.exit(1)
