"""Pre-flight plans of the LoRA training step: will it fit, how fast — before anyone rents a machine.

`plan_step` builds the model abstractly (no weights), places every parameter, LoRA adapter, Adam moment
and batch array on a mesh over the target's devices (a TPU *topology*, which libtpu compiles for on any
CPU machine, or the local devices), AOT-compiles the real training step (`training.step.make_train_step`)
and reports XLA's own memory and cost analysis for one chip. `suggest` walks a ladder of changes, cheapest
first (remat, int8, int4, host offload, smaller micro-batch with more accumulation, lower resolution),
and returns the first whose compiled plan fits.

Peak = arguments + outputs − donated aliases + temporaries (+ code), as XLA allocates them; host-memory
arguments (`offload="base"`) are reported apart. When the device-resident arguments alone exceed the budget
nothing is compiled (`peak_source: "arguments_lower_bound"`). When the TPU compiler refuses the program (HBM OOM), the
figure in its error is not the real need (it reports what an un-rematerialised schedule would take); the
plan then compiles the same step with shorter stacks, fits temporaries = a + b·blocks and reports the
full-depth arguments + extrapolated temporaries (`peak_source: "extrapolated"`). FLOPs are counted on the
step's jaxpr (every matmul × scan length, remat recomputation included, splash kernels by FlashAttention
accounting), because XLA's cost analysis counts the layer scan's body once. Estimated step time =
max(FLOPs / chip peak at the assumed MFU, offload transfer time): a lower bound at 100 % MFU.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .. import parallel
from ..cache_format import MANIFEST, CachedDataset
from ..config import DiTConfig, ModelOptions, preset
from ..lora.plan import resolve_options
from ..models.dit import abstract_model, count_params
from ..models.offload import HOST, is_offloaded
from ..weights.loader import open_lazy_params
from .config import ObjectiveSection, OptimSection, TrainConfig
from .data import text_bucket
from .step import make_optimizer, make_train_step

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator: peak dense bf16 TFLOP/s, memory, the budget a plan must stay under, and the host
    memory per chip that offloaded weights may use (None: unknown, not checked)."""

    name: str
    peak_tflops: float | None
    hbm_gib: float
    budget_gib: float
    host_budget_gib: float | None = None


# TPU generations: peak dense bf16 and HBM per chip from Google Cloud's TPU system-architecture pages
# (cloud.google.com/tpu/docs/v5e, /v5p, /v6e). The budget leaves room for the runtime. Host memory per chip
# from the TPU VM machine types (v5e: ct5lp-hightpu-1t/4t/8t, 48 GB a chip; v6e: ct6e-standard-1t, 176 GB;
# 4t/8t 180 GB a chip), 80 % of it for offloaded weights; v5p / v4 unchecked.
TPU_CHIPS = {
    "v5e": Chip("v5e", 197.0, 16.0, 15.0, 0.8 * 48e9 / GiB),
    "v5p": Chip("v5p", 459.0, 95.0, 90.0),
    "v6e": Chip("v6e", 918.0, 32.0, 30.0, 0.8 * 176e9 / GiB),
    "v4": Chip("v4", 275.0, 32.0, 30.0),
}
TPU_KINDS = {"TPU v5 lite": "v5e", "TPU v6 lite": "v6e", "TPU v5": "v5p", "TPU v5p": "v5p", "TPU v4": "v4"}
# NVIDIA GPUs by device-kind substring: peak dense bf16 (fp16 on T4, which has no bf16) TFLOP/s from
# NVIDIA's datasheets (A100, H100 SXM, H200, L4, T4; RTX 4090 / 3090: Ada / Ampere whitepapers).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0, "T4": 65.0, "4090": 165.0,
                   "3090": 71.0, "A10": 125.0}

# transfer rate from host memory for offload="base": PCIe Gen4 ×16 is 32 GB/s a direction on paper; 25 GB/s
# is what pinned copies reach in practice. TPU hosts attach chips over PCIe too (no published per-chip figure).
HOST_GBPS = 25.0


@dataclasses.dataclass(frozen=True)
class Target:
    """Where a plan compiles: devices (real or a topology's) and what one of them offers."""

    name: str
    devices: Sequence[Any]
    chip: Chip


def chip_of(topology: str) -> Chip:
    gen = topology.split(":")[0].lower()
    if gen not in TPU_CHIPS:
        raise ValueError(f"unknown TPU generation {gen!r} in topology {topology!r}; known: {sorted(TPU_CHIPS)}")
    return TPU_CHIPS[gen]


def topology_devices(name: str) -> list[Any]:
    """The devices of a TPU topology (`v5e:1x1`, `v6e:2x4`, …) for AOT compiles; needs libtpu."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # no libtpu, bad name
        raise ValueError(f"cannot describe TPU topology {name!r} ({' '.join(str(e).split())[:200]}); install the "
                         f"tpu-plan extra (pip install -e .[tpu-plan]) and use names like v5e:1x1, v6e:2x4") from None


def tpu_target(topology: str) -> Target:
    chip = chip_of(topology)
    return Target(topology, topology_devices(topology), chip)


def device_target(devices: Sequence[Any] | None = None) -> Target:
    """The local devices (a GPU or TPU machine): memory from the runtime (on GPUs what JAX may allocate,
    `XLA_PYTHON_CLIENT_MEM_FRACTION` of the card), peak FLOP/s from the tables; the budget is 94 % of it, and
    80 % of the machine's RAM (shared by its chips) for offloaded weights."""
    devices = list(devices or jax.devices())
    d = devices[0]
    stats = d.memory_stats() or {}
    if "bytes_limit" not in stats:
        raise ValueError(f"{d.device_kind} ({d.platform}) reports no memory limit: plan for a TPU topology instead "
                         f"(--plan v5e:1x1)")
    hbm = stats["bytes_limit"] / GiB
    kind = d.device_kind
    tpu = TPU_CHIPS.get(TPU_KINDS.get(kind, "")) if d.platform == "tpu" else None
    peak = tpu.peak_tflops if tpu else next((v for k, v in GPU_PEAK_TFLOPS.items() if k in kind), None)
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB / max(1, jax.local_device_count())
    return Target("device", devices, Chip(kind, peak, hbm, hbm * 0.94, host * 0.8))


@dataclasses.dataclass(frozen=True)
class Workload:
    """One training micro-step's shapes: the token grids (target first, then references), prompt bucket,
    global micro-batch and gradient-accumulation steps."""

    img_shapes: tuple[tuple[int, int, int], ...]
    text_len: int = 256
    batch: int = 1
    grad_accum: int = 1

    @classmethod
    def square(cls, cfg: DiTConfig, size: int = 1024, refs: int = 1, **kw: Any) -> Workload:
        return cls.from_pixels(cfg, size, size, refs, **kw)

    @classmethod
    def from_pixels(cls, cfg: DiTConfig, height: int, width: int, refs: int = 1, **kw: Any) -> Workload:
        """Target and `refs` references of `height`×`width` pixels (VAE /8, then patch_size² patches)."""
        f = 8 * cfg.patch_size
        if height % f or width % f:
            raise ValueError(f"height/width must be multiples of {f}, got {height}×{width}")
        return cls(((1, height // f, width // f),) * (1 + refs), **kw)

    def pixels(self, cfg: DiTConfig) -> tuple[int, int]:
        _, h, w = self.img_shapes[0]
        return h * 8 * cfg.patch_size, w * 8 * cfg.patch_size

    def scaled(self, factor: float) -> Workload:
        """Every image's token grid scaled by `factor` per side (rounded down, at least 1)."""
        return dataclasses.replace(self, img_shapes=tuple((f, max(1, int(h * factor)), max(1, int(w * factor)))
                                                          for f, h, w in self.img_shapes))


def shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of an abstract array (int4: half a byte a value)."""
    shape = x.shape if x.sharding is None else x.sharding.shard_shape(x.shape)
    return int(np.prod(shape)) * jax.dtypes.itemsize_bits(x.dtype) // 8


def hbm_oom_temp(err: Exception) -> int | None:
    """Bytes of HLO temporaries from XLA's compile-time HBM OOM message (None: another error)."""
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", str(err))
    if "RESOURCE_EXHAUSTED" not in str(err) or m is None:
        return None
    return int(float(m.group(1)) * 1024 ** "KMGT".index(m.group(2)) * 1024)


@dataclasses.dataclass
class StepProgram:
    """The abstract arguments of one training step and how to lower it."""

    lower: Callable[[], Any]
    jaxpr: Callable[[], Any]
    base: Any  # abstract frozen base (ShapeDtypeStructs with shardings)
    device_arg_bytes: int  # per-device bytes of the arguments that live in device memory


def build_step(cfg: DiTConfig, opts: ModelOptions, mesh: Mesh, workload: Workload,
               optim: OptimSection = OptimSection(), objective: ObjectiveSection = ObjectiveSection(),
               ema_decay: float | None = None) -> StepProgram:
    """The real LoRA training step for `cfg` on `mesh` with abstract, placed arguments (`ema_decay`: the
    optimiser state also holds the adapters' EMA, `train.ema_decay`)."""
    opts = resolve_options(opts, cfg)  # per-layer adapter plan for this (possibly extrapolated) depth
    graphdef, lora_abs, base_abs = nnx.split(abstract_model(cfg, opts), nnx.LoRAParam, ...)

    def placed(state, offload=False):
        sh = nnx.to_pure_dict(parallel.param_shardings(state, mesh))
        if offload:  # the blocks' frozen kernels in host memory (models/offload.py)
            sh = jax.tree_util.tree_map_with_path(
                lambda p, s: s.with_memory_kind(HOST) if is_offloaded(jax.tree_util.keystr(p, simple=True,
                                                                                           separator=".")) else s, sh)
        vals = nnx.to_pure_dict(state)
        return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), vals, sh)

    params, base = placed(lora_abs), placed(base_abs, opts.offload == "base")
    tx, _ = make_optimizer(optim, max_steps=1000, ema_decay=ema_decay)
    opt_abs = jax.eval_shape(tx.init, params)
    opt_sh = parallel.like_params(opt_abs, params, jax.tree.map(lambda x: x.sharding, params), mesh)
    opt_state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), opt_abs, opt_sh)

    n_target = int(np.prod(workload.img_shapes[0]))
    n_refs = sum(int(np.prod(s)) for s in workload.img_shapes[1:])
    a, b, c = workload.grad_accum, workload.batch, cfg.in_channels
    arrays = {
        "target": jax.ShapeDtypeStruct((a, b, n_target, c), jnp.float32),
        "references": jax.ShapeDtypeStruct((a, b, n_refs, c), jnp.float32),
        "prompt_embeds": jax.ShapeDtypeStruct((a, b, workload.text_len, cfg.joint_attention_dim), jnp.bfloat16),
        "prompt_mask": jax.ShapeDtypeStruct((a, b, workload.text_len), jnp.bool_),
    }
    rng = jax.eval_shape(lambda: jax.random.key(0))
    step_no = jax.ShapeDtypeStruct((), jnp.int32)
    step = make_train_step(graphdef, tx, objective, mesh=mesh)
    img_shapes = list(workload.img_shapes)

    def jaxpr():
        """The step's jaxpr (traced under the mesh, as jit does) for FLOP counting."""
        fn = step._step_fn(tuple(img_shapes)).fn  # the un-jitted step function
        with jax.set_mesh(mesh):
            return jax.make_jaxpr(fn)(params, opt_state, base, arrays, rng, step_no).jaxpr

    accum = NamedSharding(mesh, PartitionSpec(None, *parallel.batch_sharding(mesh, b).spec))
    arg_bytes = sum(shard_bytes(x) for t in (params, opt_state, base) for x in jax.tree.leaves(t)
                    if x.sharding.memory_kind != HOST)
    arg_bytes += sum(shard_bytes(jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=accum)) for x in arrays.values())
    return StepProgram(lambda: step.lower(params, opt_state, base, img_shapes, arrays, rng, step_no), jaxpr, base,
                       arg_bytes)


def compile_memory(lowered: Any, arg_bytes: int) -> tuple[dict[str, int], int, float, int | None]:
    """(sizes, peak bytes, XLA flops, OOM temporaries or None) of one AOT compile."""
    try:
        compiled = lowered.compile()
    except Exception as e:  # the TPU compiler refuses programs that cannot fit in HBM
        oom = hbm_oom_temp(e)
        if oom is None:
            raise
        # lower bound: the arguments plus the temporaries XLA reported needing
        return dict(argument=arg_bytes, output=0, alias=0, temp=oom, host=0, host_temp=0), arg_bytes + oom, 0.0, oom
    mem = compiled.memory_analysis()
    sizes = dict(argument=mem.argument_size_in_bytes, output=mem.output_size_in_bytes,
                 alias=mem.alias_size_in_bytes, temp=mem.temp_size_in_bytes,
                 host=mem.host_argument_size_in_bytes, host_temp=mem.host_temp_size_in_bytes)
    peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"] + mem.generated_code_size_in_bytes
    cost = compiled.cost_analysis()
    return sizes, peak, float((cost[0] if isinstance(cost, (list, tuple)) else cost).get("flops", 0.0)), None


SPLASH_BWD_MATMULS = {"fwd": 2, "dkv": 5, "dq": 3}  # S×S×d matmuls per splash kernel phase (fused bwd: dkv)


def _sub_jaxprs(params: dict):
    for v in params.values():
        for x in v if isinstance(v, (list, tuple)) else [v]:
            if isinstance(x, jcore.ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, jcore.Jaxpr):
                yield x


def _splash_flops(eqn) -> float:
    """FLOPs of one splash `pallas_call` from its operand shapes (q, k, v are [..., H, S, d])."""
    phase = next((p for p in SPLASH_BWD_MATMULS if f"_{p}" in str(eqn.params.get("name", ""))), None)
    shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
    # q, k, v (and do) are the highest-rank operands: [B, H, S, d], or [H, S, d] when vmap drops a batch
    # of 1 (one sample per chip); lower-rank ones ([B, S, 128] lane-broadcast residuals) can be larger
    # when H·d < 128 and must not be taken for q
    rank = max((len(sh) for sh in shapes), default=0)
    shapes = [sh for sh in shapes if len(sh) == rank >= 3]
    if phase is None or not shapes:
        return 0.0
    big = max(int(np.prod(sh)) for sh in shapes)
    qk = [sh for sh in shapes if int(np.prod(sh)) == big]  # q, k (, v, do): the largest operands, not mask tables
    q, k = qk[0], qk[1 if len(qk) > 1 else 0]
    return 2.0 * SPLASH_BWD_MATMULS[phase] * float(np.prod(q[:-1])) * k[-2] * q[-1]


def count_flops(jaxpr, mult: float = 1.0, out: dict | None = None) -> dict:
    """Matmul FLOPs of a step's jaxpr: {'global': outside shard_map (global shapes),
    'local': inside shard_map (one device's shapes), 'attention': splash kernels (local)}.

    Walks every sub-jaxpr: scan bodies × length, remat recomputation where autodiff placed it,
    custom-VJP backward passes (the offloaded scan's), splash kernels by phase (fwd 2, fused backward 5
    S²d matmuls: FlashAttention accounting). XLA's own cost analysis counts a while-loop body once, so it
    cannot see the 60-layer scan.
    """
    out = out if out is not None else {"global": 0.0, "local": 0.0, "attention": 0.0, "_in_shard_map": False}
    where = "local" if out["_in_shard_map"] else "global"
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            out[where] += mult * 2.0 * float(np.prod(eqn.outvars[0].aval.shape)) * float(np.prod([lhs[i] for i in lc]))
        elif name == "pallas_call":
            out["attention"] += mult * _splash_flops(eqn)
        elif name == "scan":
            count_flops(eqn.params["jaxpr"].jaxpr, mult * eqn.params["length"], out)
        elif name == "cond":
            branches = [count_flops(b.jaxpr, mult) for b in eqn.params["branches"]]
            best = max(branches, key=lambda d: d["global"] + d["local"] + d["attention"])
            for k in ("global", "local", "attention"):
                out[k] += best[k]
        elif name == "shard_map":
            inside, out["_in_shard_map"] = out["_in_shard_map"], True
            for sub in _sub_jaxprs(eqn.params):
                count_flops(sub, mult, out)
            out["_in_shard_map"] = inside
        else:
            for sub in _sub_jaxprs(eqn.params):
                count_flops(sub, mult, out)
    return out


def flops_per_device(step_jaxpr, mesh: Mesh, batch: int) -> dict:
    """Per-device FLOPs: global matmuls split over the devices that share the work (batch shards ×
    tensor), plus the per-device work inside shard_map (splash attention)."""
    c = count_flops(step_jaxpr)
    shape = dict(mesh.shape)
    split = int(np.prod([shape[a] for a in parallel.batch_axes_for(mesh, batch)])) * shape.get("tensor", 1)
    matmul = c["global"] / split + c["local"]
    return {"matmul": matmul, "attention": c["attention"], "total": matmul + c["attention"]}


@dataclasses.dataclass
class StepMemory:
    """Peak memory of one step program per device, and where the figure comes from (`peak_source`)."""

    sizes: dict[str, int]  # argument, output, alias, temp, host, host_temp bytes
    peak: int
    xla_reported: float  # XLA's cost-analysis FLOPs
    oom: int | None  # temporaries named by an out-of-memory refusal
    source: str
    fitted: dict[int, dict]  # shorter stacks' sizes, when extrapolated
    lower_s: float = 0.0
    compile_s: float = 0.0


def step_memory(prog: StepProgram, chip: Chip, build: Callable[[DiTConfig], StepProgram], cfg: DiTConfig,
                extrapolate: Sequence[int]) -> StepMemory:
    """Compile `prog` (unless its arguments alone exceed the chip) and read its memory; when XLA refuses the
    full stack, fit the temporaries linearly on the `extrapolate` shorter stacks built by `build`."""
    if prog.device_arg_bytes > chip.budget_gib * GiB:  # the arguments alone do not fit: nothing to compile
        sizes = dict(argument=prog.device_arg_bytes, output=0, alias=0, temp=0, host=0, host_temp=0)
        return StepMemory(sizes, prog.device_arg_bytes, 0.0, None, "arguments_lower_bound", {})
    t0 = time.perf_counter()
    lowered = prog.lower()
    t1 = time.perf_counter()
    sizes, peak, xla_reported, oom = compile_memory(lowered, prog.device_arg_bytes)
    mem = StepMemory(sizes, peak, xla_reported, oom, "compiled" if oom is None else "oom_lower_bound", {},
                     t1 - t0, time.perf_counter() - t1)
    short = sorted(set(int(n) for n in extrapolate) - {cfg.num_layers})
    if oom is None or len(short) < 2 or max(short) >= cfg.num_layers:
        return mem
    for n in short:  # the same step on shorter stacks (all else equal): temporaries grow linearly
        s_n, _, _, oom_n = compile_memory(build(dataclasses.replace(cfg, num_layers=n)).lower(), 0)
        if oom_n is not None:
            break
        mem.fitted[n] = s_n
    if len(mem.fitted) == len(short):
        ns = np.array(list(mem.fitted), float)
        temps = np.array([mem.fitted[n]["temp"] for n in mem.fitted], float)
        slope, icept = np.polyfit(ns, temps, 1)
        last = mem.fitted[max(mem.fitted)]
        mem.sizes = dict(last, argument=prog.device_arg_bytes, temp=int(round(icept + slope * cfg.num_layers)))
        mem.peak = prog.device_arg_bytes + mem.sizes["output"] - mem.sizes["alias"] + mem.sizes["temp"]
        mem.source = "extrapolated"
    return mem


def plan_step(cfg: DiTConfig, opts: ModelOptions, target: Target, mesh: Mesh, workload: Workload, *,
              optim: OptimSection = OptimSection(), objective: ObjectiveSection = ObjectiveSection(),
              ema_decay: float | None = None, extrapolate: Sequence[int] = (4, 8), mfu: float = 1.0,
              host_gbps: float = HOST_GBPS) -> dict:
    """Compile the step for `target` and return the plan as a flat dict (the JSON line of the CLIs)."""
    chip = target.chip
    model_abs = abstract_model(cfg, resolve_options(opts, cfg))
    prog = build_step(cfg, opts, mesh, workload, optim, objective, ema_decay)
    mem = step_memory(prog, chip, lambda c: build_step(c, opts, mesh, workload, optim, objective, ema_decay), cfg,
                      extrapolate)
    sizes, peak, oom, source = mem.sizes, mem.peak, mem.oom, mem.source
    flops = flops_per_device(prog.jaxpr(), mesh, workload.batch)
    leaves = jax.tree.leaves(prog.base)
    weights = sum(shard_bytes(x) for x in leaves)
    # offload: every block's frozen kernels cross the host link twice a step (forward, recomputing backward),
    # plus one repeated prefetch per direction (models/offload.py), for each micro-batch
    on_host = sum(shard_bytes(x) for x in leaves if x.sharding.memory_kind == HOST)
    moved = on_host * 2 * (cfg.num_layers + 1) // cfg.num_layers * workload.grad_accum
    transfer_s = moved / (host_gbps * 1e9)
    compute_s = flops["total"] / (chip.peak_tflops * 1e12 * mfu) if chip.peak_tflops else None
    height, width = workload.pixels(cfg)
    return {
        "topology": target.name,
        "devices": len(target.devices),
        "device_kind": target.devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "height": height,
        "width": width,
        "refs": len(workload.img_shapes) - 1,
        "batch": workload.batch,
        "grad_accum": workload.grad_accum,
        "image_tokens": sum(int(np.prod(s)) for s in workload.img_shapes),
        "text_tokens": workload.text_len,
        "remat": opts.remat,
        "attention": opts.attention,
        "lora_rank": opts.lora.rank if opts.lora else 0,
        "params": count_params(model_abs),
        "lora_params": count_params(model_abs, nnx.LoRAParam),
        "weights_bytes_per_device": weights,
        "argument_bytes": sizes["argument"],
        "output_bytes": sizes["output"],
        "alias_bytes": sizes["alias"],
        "temp_bytes": sizes["temp"],
        "peak_bytes_per_device": int(peak),
        "peak_gib_per_device": peak / GiB,
        "num_layers": cfg.num_layers,
        "quantize": opts.quantize,
        "offload": opts.offload,
        "host_bytes_per_device": sizes["host"],  # offloaded kernels in host memory (XLA's argument figure)
        "host_temp_bytes": sizes["host_temp"],  # host-memory temporaries XLA allocates
        "transfer_bytes_per_step": moved,
        "host_link_gbps": host_gbps,
        "transfer_s": transfer_s,
        "compile_oom": oom is not None,  # XLA refused the full stack
        # "compiled": XLA's memory analysis; "extrapolated": full-depth arguments + temporaries fitted on the
        # shorter stacks in `extrapolated_from`; "oom_lower_bound": arguments + the error's temporaries;
        # "arguments_lower_bound": the device-resident arguments alone exceed the budget (not compiled)
        "peak_source": source,
        "extrapolated_from": {str(n): v["temp"] for n, v in mem.fitted.items()},
        "oom_reported_temp_bytes": oom,
        "hbm_gib": chip.hbm_gib,
        "budget_gib": chip.budget_gib,
        "host_budget_gib": chip.host_budget_gib,
        "fits": source in ("compiled", "extrapolated") and peak / GiB <= chip.budget_gib
        and (chip.host_budget_gib is None or (sizes["host"] + sizes["host_temp"]) / GiB <= chip.host_budget_gib),
        "flops_per_device": flops["total"],
        "matmul_flops_per_device": flops["matmul"],
        "attention_flops_per_device": flops["attention"],
        "xla_cost_analysis_flops": mem.xla_reported,
        "chip_peak_tflops": chip.peak_tflops,
        # the next layer's copy overlaps the current layer's compute: the slower of the two sets the pace
        "est_step_s": None if compute_s is None else max(compute_s, transfer_s),
        "mfu_assumed": mfu,
        "lower_s": mem.lower_s,
        "compile_s": mem.compile_s,
    }


def format_plan(r: dict) -> str:
    """The plan as an aligned table for people (the JSON line is for programs)."""
    rows = [
        ("target", f"{r['topology']} ({r['devices']}× {r['device_kind']}), mesh {r['mesh']}"),
        ("workload", f"{r['height']}×{r['width']} + {r['refs']} ref, {r['image_tokens']} image + "
                     f"{r['text_tokens']} text tokens, batch {r['batch']} × accum {r['grad_accum']}"),
        ("model", f"{r['params']:,} params ({r['num_layers']} blocks, base {r['quantize'] or 'float'}), "
                  f"LoRA r{r['lora_rank']} {r['lora_params']:,} (fp32), remat {r['remat']}, attention {r['attention']}"),
        ("weights / chip", f"{r['weights_bytes_per_device'] / GiB:.2f} GiB"
                           + (f" ({r['host_bytes_per_device'] / GiB:.2f} GiB in host memory + "
                              f"{r['host_temp_bytes'] / GiB:.2f} GiB of host temporaries, "
                              f"{r['transfer_bytes_per_step'] / GiB:.1f} GiB moved a step: "
                              f"{r['transfer_s']:.2f} s at {r['host_link_gbps']:.0f} GB/s)"
                              if r["offload"] != "none" else "")),
        ("args / temp / out", f"{r['argument_bytes'] / GiB:.2f} / {r['temp_bytes'] / GiB:.2f} / "
                              f"{r['output_bytes'] / GiB:.2f} GiB (aliased {r['alias_bytes'] / GiB:.2f})"),
        ("peak / chip", f"{'≥ ' if r['peak_source'].endswith('lower_bound') else ''}"
                        f"{'≈ ' if r['peak_source'] == 'extrapolated' else ''}{r['peak_gib_per_device']:.2f} GiB of {r['hbm_gib']:.0f} "
                        f"(budget {r['budget_gib']:.0f}: {'fits' if r['fits'] else 'DOES NOT FIT'}"
                        + (f"; host memory over its {r['host_budget_gib']:.0f} GiB"
                           if not r["fits"] and r["peak_gib_per_device"] <= r["budget_gib"]
                           and r.get("host_budget_gib") is not None and r["peak_source"] == "compiled" else "") + ")"),
        *([("note", f"compiler refused the full stack; temporaries extrapolated from {list(r['extrapolated_from'])} "
                    f"blocks (the error claimed {r['oom_reported_temp_bytes'] / GiB:.1f} GiB)")]
          if r["peak_source"] == "extrapolated" else []),
        ("TFLOP / chip / step", f"{r['flops_per_device'] / 1e12:.1f} "
                                f"(matmuls {r['matmul_flops_per_device'] / 1e12:.1f} + "
                                f"splash {r['attention_flops_per_device'] / 1e12:.1f}; XLA's cost analysis, "
                                f"which counts the layer scan once: {r['xla_cost_analysis_flops'] / 1e12:.1f})"),
        ("est. step time", "unknown (no peak FLOP/s for this chip)" if r["est_step_s"] is None else
                           f"{r['est_step_s']:.2f} s at {r['mfu_assumed']:.0%} of {r['chip_peak_tflops']:.0f} TFLOP/s"
                           + (", the host transfer sets the pace" if r["transfer_s"] >= r["est_step_s"] > 0 else "")),
        ("lower / compile", f"{r['lower_s']:.1f} s / {r['compile_s']:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


@dataclasses.dataclass(frozen=True)
class Setting:
    """What a suggestion changes: model options and the workload (as config overrides for the trainer)."""

    opts: ModelOptions
    workload: Workload
    overrides: tuple[str, ...] = ()


def ladder(cfg: DiTConfig, opts: ModelOptions, workload: Workload) -> list[Setting]:
    """Changes that lower the peak, cheapest first, each on top of the ones before it: full remat (compute
    only), an int8 base (a little quality), the int8 base offloaded to host memory (transfer time, host RAM),
    an int4 base (more quality), the int4 base offloaded, half the micro-batch with twice the accumulation
    (same effective batch, slower), then 3/4 and 1/2 of the image side (different training data)."""
    steps: list[Setting] = []
    cur, over = opts, []

    def add(**changes: Any) -> None:
        """Apply `changes` on top of the rungs so far."""
        nonlocal cur
        cur = dataclasses.replace(cur, **changes)
        steps.append(Setting(cur, workload, tuple(over)))

    def offloaded() -> None:
        """A rung with the base in host memory; the next rungs keep it on the device."""
        if cur.offload != "base":
            steps.append(Setting(dataclasses.replace(cur, offload="base"), workload,
                                 tuple(over + ["model.offload=base"])))

    if cur.remat != "full":
        over.append("model.remat=full")
        add(remat="full")
    if cur.quantize not in ("int8", "fp8", "int4"):
        over.append("model.quantize=int8")
        add(quantize="int8")
    if cur.quantize != "int4":
        offloaded()
        over[:] = [o for o in over if not o.startswith("model.quantize")] + ["model.quantize=int4"]
        add(quantize="int4")
    if cur.offload != "base":
        over.append("model.offload=base")
        add(offload="base")
    wl = workload
    while wl.batch > 1 and wl.batch % 2 == 0:
        wl = dataclasses.replace(wl, batch=wl.batch // 2, grad_accum=wl.grad_accum * 2)
        steps.append(Setting(cur, wl, tuple(over + [f"data.batch_size={wl.batch}", f"optim.grad_accum={wl.grad_accum}"])))
    last = list(steps[-1].overrides) if steps else []
    for factor in (0.75, 0.5):  # the cache must be made again at the smaller size
        steps.append(Setting(cur, wl.scaled(factor), tuple(last)))
    return steps


def suggest(cfg: DiTConfig, opts: ModelOptions, target: Target, mesh: Mesh, workload: Workload, *,
            log: Callable[[str], None] = lambda s: None, **kw: Any) -> tuple[Setting | None, dict | None, list]:
    """(setting, its plan, [(setting, plan), …]) of the first rung of `ladder` that fits; rungs whose
    device-resident arguments alone exceed the budget are not compiled (`plan_step`)."""
    tried: list = []
    for setting in ladder(cfg, opts, workload):
        h, w = setting.workload.pixels(cfg)
        log(f"plan: trying {' '.join(setting.overrides)} at {h}x{w}, batch {setting.workload.batch}")
        result = plan_step(cfg, setting.opts, target, mesh, setting.workload, extrapolate=(), **kw)
        tried.append((setting, result))
        if result["fits"]:
            return setting, result, tried
    return None, None, tried


def config_model(cfg: TrainConfig, log: Callable[[str], None] = lambda s: None) -> DiTConfig:
    """The DiT a training config would load: `config.json` (any layout) at `model.path` when it exists, else the
    Qwen-Image-Edit preset — no weights are read."""
    path = cfg.model.path
    if path and os.path.exists(path):
        return open_lazy_params(path).config
    log(f"plan: model.path {path!r} not found; planning the qwen-image-edit preset (20.4B, 60 blocks)")
    return preset("qwen-image-edit")


def config_workload(cfg: TrainConfig, dit: DiTConfig, log: Callable[[str], None] = lambda s: None) -> Workload:
    """The largest micro-batch the config trains on: the cache's largest sample (images and prompt bucket)
    when `data.path` (or a `data.datasets` entry) holds one, else a 1024² edit with one 1024² reference and a 256-token prompt."""
    kw = dict(batch=cfg.data.batch_size, grad_accum=cfg.optim.grad_accum)
    caches = [p for _, p, _ in cfg.data.sources() if p and os.path.exists(os.path.join(p, MANIFEST))]
    if caches:
        infos = [i for p in caches for i in CachedDataset(p).infos]
        info = max(infos, key=lambda i: sum(int(np.prod(s)) for s in i.img_shapes))
        text = text_bucket(info.prompt_len, cfg.data.text_buckets) or max(cfg.data.text_buckets)
        return Workload(tuple(tuple(s) for s in info.img_shapes), text_len=text, **kw)
    log(f"plan: no cache at data.path {cfg.data.path!r}; planning a 1024x1024 edit + one 1024x1024 reference, "
        f"256 prompt tokens")
    return Workload.square(dit, 1024, 1, text_len=256, **kw)


def plan_training(cfg: TrainConfig, where: str, *, log: Callable[[str], None] = lambda s: None) -> dict:
    """The plan of `cfg`'s exact training step on `where` (a TPU topology such as `v5e:1x1`, or `device`: the
    local accelerators), and when it does not fit the cheapest change that does (`suggestion`, with the
    config overrides that make it, or None when nothing on the ladder fits)."""
    target = device_target() if where == "device" else tpu_target(where)
    dit = config_model(cfg, log)
    m = cfg.mesh
    devices = target.devices if m.enabled else target.devices[:1]
    mesh = parallel.make_mesh(*((m.data, m.fsdp, m.tensor) if m.enabled else (1, 1, 1)), devices=devices)
    opts, workload = cfg.model_options(), config_workload(cfg, dit, log)
    kw = dict(optim=cfg.optim, objective=cfg.objective, ema_decay=cfg.train.ema_decay)
    log(f"plan: compiling the training step for {target.name} ({len(devices)}× {devices[0].device_kind})")
    result = plan_step(dit, opts, target, mesh, workload, **kw)
    result["suggestion"], result["tried"] = None, []
    if not result["fits"]:
        setting, fit, tried = suggest(dit, opts, target, mesh, workload, log=log, **kw)
        result["tried"] = [{"overrides": list(s.overrides),
                            "host_gib": (r["host_bytes_per_device"] + r["host_temp_bytes"]) / GiB, **{k: r[k] for k in (
                                "height", "width", "batch", "fits", "peak_gib_per_device", "peak_source",
                                "budget_gib", "host_budget_gib")}} for s, r in tried]
        if setting is not None:
            result["suggestion"] = {"overrides": list(setting.overrides),
                                    "recache": setting.workload.img_shapes != workload.img_shapes,
                                    "host_gib": (fit["host_bytes_per_device"] + fit["host_temp_bytes"]) / GiB,
                                    **{k: fit[k] for k in (
                "peak_bytes_per_device", "peak_gib_per_device", "fits", "est_step_s", "transfer_s", "quantize",
                "offload", "remat", "batch", "grad_accum", "height", "width")}}
    return result


def format_suggestion(r: dict) -> str:
    """Lines for people: what was tried and the change to make (or that nothing fits)."""
    if r["fits"]:
        return "fits as configured"
    said = {"arguments_lower_bound": "{:.2f} GiB of arguments alone", "oom_lower_bound": "refused by the compiler",
            "compiled": "{:.2f} GiB", "extrapolated": "≈ {:.2f} GiB"}
    def host(t: dict) -> str:
        over = not t["fits"] and t["peak_source"] == "compiled" and t["peak_gib_per_device"] <= t["budget_gib"]
        return f", but {t['host_gib']:.1f} GiB of host memory (budget {t['host_budget_gib']:.1f})" if over else ""

    lines = [f"  tried {' '.join(t['overrides'])} at {t['height']}x{t['width']}, batch {t['batch']}: "
             + said[t["peak_source"]].format(t["peak_gib_per_device"]) + host(t) + (", fits" if t["fits"] else "")
             for t in r["tried"]]
    s = r["suggestion"]
    if s is None:
        return "\n".join(["nothing on the ladder fits this chip; use more chips (mesh.fsdp) or a smaller workload",
                           *lines])
    est = "" if s["est_step_s"] is None else f", est. step {s['est_step_s']:.2f} s at 100% MFU"
    recache = (f"; cache the dataset again at {s['height']}x{s['width']} "
               f"(train/cache_dataset.py --resolution {round((s['height'] * s['width']) ** 0.5)})" if s["recache"] else "")
    host = f", {s['host_gib']:.1f} GiB of host memory per chip" if s.get("host_gib") else ""
    return "\n".join([*lines, f"suggested: {' '.join(s['overrides'])}{recache}  "
                               f"({s['peak_gib_per_device']:.2f} GiB per chip{host}{est})"])


__all__ = ["Chip", "GiB", "HOST_GBPS", "Setting", "Target", "TPU_CHIPS", "Workload", "build_step", "chip_of",
           "compile_memory", "config_model", "config_workload", "count_flops", "device_target", "flops_per_device",
           "format_plan", "format_suggestion", "plan_training", "hbm_oom_temp", "ladder",
           "plan_step", "shard_bytes", "suggest", "topology_devices", "tpu_target"]
