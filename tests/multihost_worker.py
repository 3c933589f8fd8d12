"""One process of a multi-host LoRA training run on localhost; launched by tests/test_sharding_multihost.py.

`python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT OUT_DIR CACHE`, with
`XLA_FLAGS=--xla_force_host_platform_device_count=<8 / NUM_PROCESSES>` set by the caller. With
NUM_PROCESSES > 1 the processes meet through `jax.distributed` (coordinator on localhost:PORT) and
together own the 8 devices of one (data 2, fsdp 2, tensor 2) mesh. Each process loads only its
devices' weight shards (`load_transformer(mesh=)`), feeds only its own batch rows, trains 3 steps
of the real LoRA step, then every process takes part in an Orbax checkpoint save and restore.
Then the whole trainer, `training.train()`, runs on the same mesh (sharded load with adapters created
once, per-host rows from the cached dataset `CACHE`, checkpoints, and the LoRA export from adapters
spread over both hosts). Prints `RESULT {...}` (losses, digests, restore check); never asserts itself.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    pid, nproc, port, ckpt, out_dir, cache = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                              sys.argv[5], sys.argv[6])
    from qwen_edit_jax.parallel import distributed

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
    trained = _run_trainer(ckpt, cache, os.path.join(out_dir, "run"))
    print("RESULT " + json.dumps({
        "ok": True, "process": jax.process_index(), "processes": jax.process_count(), "distributed": started,
        "devices": jax.device_count(), "local_devices": jax.local_device_count(), "rows": rows.tolist(),
        "losses": losses, "digest": digest, "restored_equal": same, "meta": meta,
        "restored_sharding": str(restored["transformer_blocks"]["attn"]["to_qkv"]["lora_A"].sharding.spec),
        "lora_a_local_shards": len(leaf.addressable_shards), **trained,
    }), flush=True)


def _run_trainer(model_path: str, cache: str, out_dir: str) -> dict:
    """`training.train` end to end on the (2, 2, 2) mesh; the exported LoRA file's content as numbers."""
    import jax
    import numpy as np

    from qwen_edit_jax.parallel import distributed
    from qwen_edit_jax.training import load_config, train
    from qwen_edit_jax.weights.safetensors_io import TensorSource

    cfg = load_config(None, [f"model.path={model_path}", f"data.path={cache}", "model.dtype=float32",
                             "model.param_dtype=float32", "model.remat=none", "lora.rank=4", "data.batch_size=8",
                             "data.text_buckets=[16]", "data.shuffle=false", "optim.eps=1e-3",
                             "optim.learning_rate=1e-2", "mesh.enabled=true", "mesh.data=2", "mesh.fsdp=2",
                             "mesh.tensor=2", "train.max_steps=3", "train.save_every=2", "train.progress=false",
                             "train.async_checkpointing=false"])
    res = train(cfg, out_dir, log=lambda _m: None)
    a = res.lora_params["transformer_blocks"]["attn"]["to_qkv"]["lora_A"]
    distributed.sync("exported")  # process 0 wrote the file; every process reads it back
    src = TensorSource.open(res.lora_files[0])
    tensors = {k: src.get(k).astype(np.float64) for k in sorted(src.keys())}
    return {"train_first_loss": res.first_loss, "train_last_loss": res.last_loss,
            "train_lora_fully_addressable": bool(a.is_fully_addressable),
            "export_keys": len(tensors), "export_sum_sq": float(sum(np.sum(t * t) for t in tensors.values())),
            "export_sum": float(sum(np.sum(t) for t in tensors.values())), "devices_seen": jax.device_count()}


if __name__ == "__main__":
    try:
        main()
    except Exception:
        print("RESULT " + json.dumps({"ok": False, "error": traceback.format_exc()}), flush=True)
        sys.exit(1)
