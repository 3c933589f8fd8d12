"""One process of a multi-host LoRA training run on localhost; launched by tests/test_sharding_multihost.py.

`python tests/multihost_worker.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT OUT_DIR CACHE`, with
`XLA_FLAGS=--xla_force_host_platform_device_count=<8 / NUM_PROCESSES>` set by the caller. With
NUM_PROCESSES > 1 the processes meet through `jax.distributed` (coordinator on localhost:PORT) and
together own the 8 devices of one (data 2, fsdp 2, tensor 2) mesh. The whole trainer,
`training.train()`, runs 3 steps on that mesh: each process loads only its devices' weight shards,
creates the adapters once, already spread over the hosts, feeds only its own rows of the cached
dataset `CACHE`, takes part in every (asynchronous) Orbax save, and in the LoRA export gathered from
adapters spread over both hosts. Then every process restores the last checkpoint straight into the
sharded layout. Prints `RESULT {...}` (losses, digests, restore check); never asserts itself.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STEPS = 3


def train_overrides(model_path: str, cache: str, mesh: bool = True) -> list[str]:
    """The run's config (`load_config` overrides); `mesh=False`: the same run on one device."""
    sharding = ["mesh.enabled=true", "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"] if mesh else ["mesh.enabled=false"]
    # optim.eps: Adam's g/(|g|+eps) must not turn float noise in near-zero gradients into ±lr steps
    return [f"model.path={model_path}", f"data.path={cache}", "model.dtype=float32", "model.param_dtype=float32",
            "model.remat=none", "lora.rank=4", "data.batch_size=8", "data.text_buckets=[16]", "data.shuffle=false",
            "optim.eps=1e-3", "optim.learning_rate=1e-2", *sharding, f"train.max_steps={STEPS}", "train.save_every=2",
            "train.progress=false", "train.log_every=1"]


def losses_of(run_dir: str) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def export_numbers(path: str) -> dict:
    """The exported LoRA file's content as numbers (key count, sum, sum of squares)."""
    import numpy as np

    from qwen_edit_jax.weights.safetensors_io import TensorSource

    src = TensorSource.open(path)
    tensors = {k: src.get(k).astype(np.float64) for k in sorted(src.keys())}
    return {"export_keys": len(tensors), "export_sum_sq": float(sum(np.sum(t * t) for t in tensors.values())),
            "export_sum": float(sum(np.sum(t) for t in tensors.values()))}


def main() -> None:
    pid, nproc, port, ckpt, out_dir, cache = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4],
                                              sys.argv[5], sys.argv[6])
    from qwen_edit_jax.parallel import distributed

    started = distributed.initialize(f"localhost:{port}" if nproc > 1 else None, nproc if nproc > 1 else None,
                                     pid if nproc > 1 else None, initialization_timeout=120)
    import jax
    import jax.numpy as jnp

    from qwen_edit_jax import parallel
    from qwen_edit_jax.training import load_config, train
    from qwen_edit_jax.training.checkpoint import TrainCheckpointer
    from qwen_edit_jax.training.step import make_optimizer

    run_dir = os.path.join(out_dir, "run")
    cfg = load_config(None, train_overrides(ckpt, cache))
    res = train(cfg, run_dir, log=lambda _m: None)
    params = res.lora_params
    mesh = parallel.make_mesh(2, 2, 2)
    rows = distributed.local_batch_rows(parallel.batch_sharding(mesh, cfg.data.batch_size), cfg.data.batch_size)
    digest = float(jax.jit(lambda t: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(t)))(params))

    # every process restores the last checkpoint into the sharded layout of the trained adapters
    tx, _ = make_optimizer(cfg.optim, STEPS)
    ck = TrainCheckpointer(os.path.join(run_dir, "checkpoints"))
    restored, _, meta = ck.restore(STEPS, params, parallel.init_opt_state(tx, params, mesh))

    def all_equal(a, b):
        return jnp.all(jnp.array([jnp.all(x == y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]))

    same = bool(jax.jit(all_equal)(restored, params))
    ck.close()
    leaf = params["transformer_blocks"]["attn"]["to_qkv"]["lora_A"]
    distributed.sync("exported")  # process 0 wrote the LoRA file and metrics.jsonl; every process reads them
    print("RESULT " + json.dumps({
        "ok": True, "process": jax.process_index(), "processes": jax.process_count(), "distributed": started,
        "devices": jax.device_count(), "local_devices": jax.local_device_count(), "rows": rows.tolist(),
        "losses": losses_of(run_dir), "digest": digest, "restored_equal": same, "meta_step": meta["step"],
        "restored_sharding": str(restored["transformer_blocks"]["attn"]["to_qkv"]["lora_A"].sharding.spec),
        "lora_a_local_shards": len(leaf.addressable_shards), "train_first_loss": res.first_loss,
        "train_last_loss": res.last_loss, "train_lora_fully_addressable": bool(leaf.is_fully_addressable),
        **export_numbers(res.lora_files[0]),
    }), flush=True)


if __name__ == "__main__":
    try:
        main()
    except Exception:
        print("RESULT " + json.dumps({"ok": False, "error": traceback.format_exc()}), flush=True)
        sys.exit(1)
