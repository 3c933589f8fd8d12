"""Sharding checks that need several devices; run as a subprocess by tests/test_sharding.py.

`python tests/sharding_worker.py SCENARIO[,SCENARIO...] [ARG]` with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` set by the caller (it must be set before jax is
imported, so it cannot run inside the pytest process). Runs the scenarios one after the other in this
process and prints one JSON line `RESULT {"ok": ..., SCENARIO: {...}, ...}` with the numbers the test
asserts on; never asserts itself. (ARG: the checkpoint folder of the `load` scenario; by default a
random tiny diffusers checkpoint written to a temporary folder.)
"""

from __future__ import annotations

import json
import os
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import qwen_edit_jax as q  # noqa: E402
from qwen_edit_jax import parallel  # noqa: E402
from qwen_edit_jax.config import LoraConfig, ModelOptions  # noqa: E402
from qwen_edit_jax.sampling import sharded_forward  # noqa: E402
from tests.compare import rel_err  # noqa: E402

MESHES = [(1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1)]
CFG = q.preset("tiny")
IMG_SHAPES = [(1, 4, 4), (1, 2, 6)]  # target + one reference: 28 image tokens
N_IMG, TXT = 28, 9



def options(attention="xla", remat="none") -> ModelOptions:
    return ModelOptions(attention=attention, remat=remat, lora=LoraConfig(rank=4))


def random_lora(model, seed=1):
    """LoRA B is zero at init; make every adapter active so the checks see it (noise drawn on the host:
    no random-number program to compile)."""
    rng = np.random.default_rng(seed)
    st = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32), st))


_STATE = []


def base_state():
    """The weights every scenario uses, in host memory: the tiny model (seed 0) with random active
    adapters; made once."""
    if not _STATE:
        model = q.init_transformer(CFG, options(), seed=0)
        random_lora(model)
        _STATE.append(jax.tree.map(np.asarray, nnx.state(model)))
    return _STATE[0]


def inputs(batch, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((batch, N_IMG, CFG.in_channels), dtype=np.float32)
    enc = rng.standard_normal((batch, TXT, CFG.joint_attention_dim), dtype=np.float32)
    mask = np.ones((batch, TXT), bool)
    mask[1, -3:] = False
    mask[-1, -5:] = False
    sigma = rng.uniform(0.1, 0.9, batch).astype(np.float32)
    return hidden, enc, mask, sigma


def fresh(host_state, attention="xla", remat="none", mesh=None):
    """A model holding `host_state`'s values (its own arrays: a training step donates them), built
    abstractly (no weights initialised), placed on `mesh` by `shard_model` or on the default device.
    From host memory, placing on a mesh copies each device's slice; resharding arrays already on a
    device would compile a program per leaf and mesh."""
    m = q.abstract_model(CFG, options(attention, remat))
    nnx.update(m, host_state)
    if mesh is not None:
        return parallel.shard_model(m, mesh)
    nnx.update(m, jax.device_put(nnx.state(m)))
    return m


def scenario_forward(_arg):
    """Sharded forward == single-device forward on several meshes; parameters really split."""
    state = base_state()
    ref_model = fresh(state)
    x8, x3 = inputs(8), inputs(3)  # 3: not divisible by the batch axes → replicated batch
    ref8, ref3 = np.asarray(ref_model(*x8, IMG_SHAPES)), np.asarray(ref_model(*x3, IMG_SHAPES))
    out = {}
    for m in MESHES:
        mesh = parallel.make_mesh(*m)
        model = fresh(state, mesh=mesh)
        fwd = sharded_forward(model, mesh, IMG_SHAPES)
        for batch, x, ref in ((8, x8, ref8), (3, x3, ref3))[:2 if m in MESHES[:2] else 1]:
            y = fwd(*x)
            out[f"{m}/b{batch}"] = {"rel_err": rel_err(y, ref), "out_spec": str(y.sharding.spec)}
        # where the big weights live
        flat = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(nnx.state(model))}
        shapes = {k: [list(a.shape), list(a.addressable_shards[0].data.shape)] for k, a in flat.items()}
        total = sum(a.nbytes for a in flat.values())
        per_dev = max(sum(a.addressable_shards[i].data.nbytes for a in flat.values()) for i in range(8))
        out[f"{m}/layout"] = {"shapes": shapes, "total_bytes": total, "max_device_bytes": per_dev}
    return out


def _train_setup(mesh, attention="xla", remat="none"):
    from qwen_edit_jax.training.config import ObjectiveSection, OptimSection
    from qwen_edit_jax.training.step import make_optimizer, make_train_step, split_lora

    model = fresh(base_state(), attention, remat, mesh)
    graphdef, params, base = split_lora(model)
    # Adam's eps 1e-3 (not 1e-8): its update g/(|g|+eps) must not turn float noise in near-zero
    # gradients into ±lr steps, or equal programs would differ by reduction order alone.
    tx, _ = make_optimizer(OptimSection(learning_rate=1e-2, warmup_steps=0, eps=1e-3), max_steps=10)
    opt = tx.init(params) if mesh is None else parallel.init_opt_state(tx, params, mesh)
    step = make_train_step(graphdef, tx, ObjectiveSection(), mesh=mesh)
    return step, params, opt, base


def train_batch(batch, seed=0):
    rng = np.random.default_rng(seed)
    n_t = 16
    return {
        "target": rng.standard_normal((1, batch, n_t, CFG.in_channels)).astype(np.float32),
        "references": rng.standard_normal((1, batch, N_IMG - n_t, CFG.in_channels)).astype(np.float32),
        "prompt_embeds": rng.standard_normal((1, batch, TXT, CFG.joint_attention_dim)).astype(np.float32),
        "prompt_mask": np.concatenate([np.ones((1, batch, TXT - 2), bool), rng.random((1, batch, 2)) > 0.5], -1),
    }


def run_steps(mesh, n=3, attention="xla", remat="none", batch=8):
    step, params, opt, base = _train_setup(mesh, attention, remat)
    rng = jax.random.key(0)
    losses = []
    for i in range(n):
        params, opt, metrics = step(params, opt, base, IMG_SHAPES, train_batch(batch, seed=i), rng, i)
        losses.append(float(metrics["loss"]))
    return losses, params, opt


def scenario_train(_arg):
    """The real LoRA training step, sharded == single-device, several meshes; LoRA + Adam state split."""
    ref_losses, ref_params, _ = run_steps(None)
    out = {"ref_losses": ref_losses}
    ref_flat = jax.tree.leaves(ref_params)
    for m in MESHES:
        mesh = parallel.make_mesh(*m)
        losses, params, opt = run_steps(mesh)
        flat = jax.tree.leaves(params)
        qkv_a = params["transformer_blocks"]["attn"]["to_qkv"]["lora_A"]
        want = ("transformer_blocks", "attn", "to_qkv", "lora_A")
        mus = [x for path, x in jax.tree_util.tree_flatten_with_path(opt)[0]  # Adam's mu and nu of that leaf
               if tuple(getattr(k, "key", None) for k in path[-4:]) == want]
        out[str(m)] = {
            "losses": losses,
            "loss_rel_err": rel_err(losses, ref_losses),
            "params_rel_err": max(rel_err(a, b) for a, b in zip(flat, ref_flat)),
            "lora_a_shard": list(qkv_a.addressable_shards[0].data.shape),
            "lora_a_shape": list(qkv_a.shape),
            "adam_shards": [list(x.addressable_shards[0].data.shape) for x in mus],
        }
    return out


def scenario_splash(_arg):
    """'splash' (Pallas, interpret mode on CPU, inside shard_map) == 'xla' in the model and the LoRA step."""
    state = base_state()
    ref_model = fresh(state)
    x = inputs(4)
    ref = np.asarray(ref_model(*x, IMG_SHAPES))
    out = {}
    single = fresh(state, "splash")
    out["single_rel_err"] = rel_err(single(*x, IMG_SHAPES), ref)
    mesh = parallel.make_mesh(2, 2, 2)
    model = fresh(state, "splash", "full", mesh)
    out["mesh_rel_err"] = rel_err(sharded_forward(model, mesh, IMG_SHAPES)(*x), ref)
    ref_losses, ref_params, _ = run_steps(None, n=2, batch=4)
    losses, params, _ = run_steps(mesh, n=2, attention="splash", remat="full", batch=4)
    out["train_loss_rel_err"] = rel_err(losses, ref_losses)
    out["train_params_rel_err"] = max(rel_err(a, b) for a, b in zip(jax.tree.leaves(params),
                                                                    jax.tree.leaves(ref_params)))
    return out


def flat_base(model) -> dict:
    """{flax path: array} of the base weights (LoRA excluded)."""
    state = nnx.state(model, q.models.dit.BASE_PARAMS)
    return {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(state)}


class CountingLazy:
    """Wraps a `LazyParams`: records, per read, the shard returned and the bytes the source copied."""

    def __init__(self, inner, sharding, reads: list, calls: list):
        self.inner, self.sharding, self.reads, self.calls = inner, sharding, reads, calls

    def shape(self, p):
        return self.inner.shape(p)

    def read(self, p, index=None, dtype=None):
        before = sum(b for _, b in self.reads)
        a = self.inner.read(p, index, dtype)
        shape = self.inner.shape(p)
        self.calls.append({"path": p, "shard_bytes": int(a.nbytes),
                           "source_bytes": sum(b for _, b in self.reads) - before,
                           "leaf_bytes": int(np.prod(shape)) * 4,  # the test checkpoint is fp32
                           "shard_shape": list(a.shape), "expected": list(self.sharding.shard_shape(shape))})
        return a


def scenario_load(path):
    """load_transformer(path, mesh=) from a diffusers folder and from a merged Orbax checkpoint:
    equal weights, every callback reads exactly its device's slice (never a whole tensor)."""
    if path is None:
        import tempfile

        from tests.torch_reference import make_torch_model, save_torch_model

        path = save_torch_model(make_torch_model(CFG, seed=5), os.path.join(tempfile.mkdtemp(), "ckpt"), sharded=True)
    from qwen_edit_jax.loading import dit as dit_loading
    from qwen_edit_jax.weights import safetensors_io
    from qwen_edit_jax.weights.checkpoint import save_merged
    from qwen_edit_jax.weights.loader import open_lazy_params

    single = q.load_transformer(path)
    ref_flat = {k: np.asarray(v) for k, v in flat_base(single).items()}
    x = inputs(8)
    ref_out = np.asarray(single(*x, IMG_SHAPES))
    src = safetensors_io.TensorSource
    orig_slice, orig_get, orig_array = src.read_slice, src.get, dit_loading.array_from_lazy
    reads: list = []  # (key, bytes copied out of the memory map)

    def counting_slice(self, key, index, **kwargs):
        a = orig_slice(self, key, index, **kwargs)
        reads.append((key, int(a.nbytes)))
        return a

    def forbidden_get(self, key):
        raise AssertionError(f"whole-tensor read of {key} during sharded loading")

    out = {}
    for m in [(1, 8, 1), (2, 2, 2), (1, 2, 4)]:
        mesh = parallel.make_mesh(*m)
        calls: list = []
        src.read_slice, src.get = counting_slice, forbidden_get
        dit_loading.array_from_lazy = lambda lazy, p, sh, dt, calls=calls: orig_array(
            CountingLazy(lazy, sh, reads, calls), p, sh, dt)
        try:
            model = q.load_transformer(path, mesh=mesh)
        finally:
            src.read_slice, src.get, dit_loading.array_from_lazy = orig_slice, orig_get, orig_array
        flat = flat_base(model)
        out[str(m)] = {
            "max_weight_diff": max(float(np.max(np.abs(np.asarray(a) - ref_flat[k]))) for k, a in flat.items()),
            "n_leaves": len(flat),
            "rel_err": rel_err(sharded_forward(model, mesh, IMG_SHAPES)(*x), ref_out),
            "calls": calls,
            "sharded_leaves": sum(parallel.is_sharded(a) for a in flat.values()),
        }
    # the converter's merged Orbax checkpoint: each device's slice read from the zarr chunks
    merged = save_merged(open_lazy_params(path), os.path.join(os.path.dirname(path), "merged"), progress=False)
    mesh = parallel.make_mesh(2, 2, 2)
    model = q.load_transformer(merged, mesh=mesh)
    flat = flat_base(model)
    want = parallel.param_shardings(nnx.state(model, q.models.dit.BASE_PARAMS), mesh)
    want = {".".join(map(str, p)): v.get_value() for p, v in nnx.to_flat_state(want)}
    out["merged"] = {
        "max_weight_diff": max(float(np.max(np.abs(np.asarray(a) - ref_flat[k]))) for k, a in flat.items()),
        "n_leaves": len(flat),
        "shardings_match": all(a.sharding.is_equivalent_to(want[k], a.ndim) for k, a in flat.items()),
        "sharded_leaves": sum(parallel.is_sharded(a) for a in flat.values()),
        "rel_err": rel_err(sharded_forward(model, mesh, IMG_SHAPES)(*x), ref_out),
    }
    return out


def scenario_seq_parallel(_arg):
    """Batch 1 on 8 devices: tokens are split instead of replicated — per-device FLOPs ≈ 1/8, same output."""
    shapes = [(1, 8, 8), (1, 8, 8)]  # 128 image tokens, divisible by 8
    model = q.init_transformer(CFG, ModelOptions(), seed=0)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((1, 128, CFG.in_channels), dtype=np.float32),
         rng.standard_normal((1, 16, CFG.joint_attention_dim), dtype=np.float32),
         np.ones((1, 16), bool), np.full((1,), 0.5, np.float32))
    graphdef, state = nnx.split(model)
    state = jax.tree.map(np.asarray, state)  # host memory: see `fresh`

    def fwd(state, hidden, enc, mask, sigma):
        return nnx.merge(graphdef, state)(hidden, enc, mask, sigma, shapes)

    single = jax.jit(fwd).lower(state, *x).compile()
    ref = np.asarray(single(state, *x))
    out = {"single_flops": single.cost_analysis()["flops"]}
    for m in [(1, 8, 1), (2, 4, 1), (1, 4, 2), (2, 2, 2)]:
        mesh = parallel.make_mesh(*m)
        st_sh = parallel.param_shardings(state, mesh)
        st = jax.device_put(state, st_sh)  # = shard_model(model, mesh)'s state
        rep = parallel.batch_sharding(mesh, 1)  # batch 1: replicated inputs; the model splits the tokens
        fn = parallel.sharded_jit(fwd, mesh, in_shardings=(st_sh, rep, rep, rep, rep), out_shardings=None)
        compiled = fn.lower(st, *x).compile()
        with jax.set_mesh(mesh):
            y = compiled(st, *x)
        out[str(m)] = {"flops": compiled.cost_analysis()["flops"], "rel_err": rel_err(y, ref),
                       "out_spec": str(y.sharding.spec)}
    return out


def main():
    names = sys.argv[1].split(",")
    arg = sys.argv[2] if len(sys.argv) > 2 else None
    try:
        result = {"ok": True, **{name: globals()[f"scenario_{name}"](arg) for name in names}}
    except Exception:
        result = {"ok": False, "error": traceback.format_exc()}
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
