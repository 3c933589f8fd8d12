"""Plan Qwen2.5-VL-7B prompt encoding of a 1 Mpx Edit batch on a TPU target without a TPU: per-chip memory.

Builds the real encoder (7.75 B parameters) abstractly, places its bf16 weights FSDP-sharded on a mesh
over a TPU *topology* (libtpu compiles for it on this CPU machine), builds the host inputs of a batch
of Edit prompts exactly as `QwenPromptEncoder` does (each ~1 Mpx image → the Edit pipeline's
`calculate_dimensions(1024², ratio)` condition image → the processor's `smart_resize` within the
released `max_pixels` 12,845,056 → patch grid; the template's token count around it), pads it to its
bucket (`encoding.bucket_key`), AOT-compiles the same program `encode_prompt` runs
(`encoding.make_encode_fn`) and reports XLA's memory analysis for one chip:

    python benchmarks/text_encoder_memory_plan.py --topology v5e:2x4 --batch 8 --vision-attention splash
    python benchmarks/text_encoder_memory_plan.py --topology v5e:1x1 --mesh 1,1,1 --batch 1 --quantize int8

Peak = arguments + outputs − aliases + temporaries + code, as XLA allocates them (as
`memory_plan.py`). Matmul FLOPs are counted on the jaxpr (scan × length; the vision blocks'
window/full `cond` counted as its costlier branch, so an upper bound). Needs libtpu
(`pip install -e .[tpu-plan]`). The last line with `--json` is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other local jax processes may hold the libtpu lock
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from qwen_edit_jax.training.plan import (  # noqa: E402
    GiB,
    chip_of,
    compile_memory,
    count_flops,
    shard_bytes,
    topology_devices,
)

# aspect ratios of the batch's source images (all ~1 Mpx after the Edit pipeline's resize)
RATIOS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 3 / 2, 2 / 3, 1.0)
RELEASED_MAX_PIXELS = 12_845_056  # processor/preprocessor_config.json of Qwen-Image-Edit (encoders.md §3.4)
TEMPLATE_TOKENS = 64 + 2 + 5  # system prefix (dropped) + vision start/end + the 5-token assistant suffix


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--topology", default="v5e:2x4", help="libtpu topology, e.g. v5e:2x4, v5p:2x2x1, v6e:2x4")
    p.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor sizes (-1 = the rest)")
    p.add_argument("--batch", type=int, default=8, help="prompts, one ~1 Mpx image each")
    p.add_argument("--prompt-tokens", type=int, default=40, help="tokens of the user instruction")
    p.add_argument("--vision-attention", default="splash", choices=["xla", "chunked", "splash"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantize", choices=["int8", "fp8"], default=None,
                   help="plan the weight-only 8-bit encoder (EncoderOptions.quantize: large linear kernels 8-bit "
                        "with fp32 per-channel scales; the rest in --dtype). Default: none")
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def edit_batch(config, batch: int, prompt_tokens: int):
    """`TextEncoderInputs` of an Edit batch with 1 Mpx images (token ids stand-ins; shapes exact)."""
    from qwen_edit_jax.imaging import calculate_dimensions
    from qwen_edit_jax.preprocess import TextEncoderInputs
    from qwen_edit_jax.preprocess.image_processor import ImageProcessorConfig, QwenImageProcessor

    proc = QwenImageProcessor(ImageProcessorConfig(min_pixels=3136, max_pixels=RELEASED_MAX_PIXELS))
    grids, rows = [], []
    for i in range(batch):
        w, h = calculate_dimensions(1024 * 1024, RATIOS[i % len(RATIOS)])
        grids.append(proc.grid_thw(h, w))
        n_image = proc.num_image_tokens(h, w)
        rows.append([1] * 64 + [config.vision_start_token_id] + [config.image_token_id] * n_image
                    + [config.vision_end_token_id] + [2] * (prompt_tokens + 5))
    n = max(map(len, rows))
    ids = np.zeros((batch, n), np.int32)
    mask = np.zeros((batch, n), np.int32)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return TextEncoderInputs(ids, mask, (ids == config.image_token_id).astype(np.int32), None,
                             np.asarray(grids, np.int32), (1,) * batch, 64, "edit")


def plan(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from qwen_edit_jax.config import as_dtype
    from qwen_edit_jax.encoding import bucket_key, input_shardings, make_encode_fn
    from qwen_edit_jax.loading.text_encoder import abstract_text_encoder
    from qwen_edit_jax.models.text_encoder import EncoderOptions, Qwen25VLConfig, prepare_inputs
    from qwen_edit_jax.parallel import make_mesh, param_shardings
    from qwen_edit_jax.preprocess import pad_inputs

    chip = chip_of(args.topology)
    devices = topology_devices(args.topology)
    data, fsdp, tensor = (int(x) for x in args.mesh.split(","))
    mesh = make_mesh(data, fsdp, tensor, devices=devices)
    config = Qwen25VLConfig()
    dt = as_dtype(args.dtype)
    options = EncoderOptions(dtype=dt, param_dtype=dt, attention=args.vision_attention, quantize=args.quantize)
    graphdef, state = nnx.split(abstract_text_encoder(config, options))
    sh = param_shardings(state, mesh)
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s), state, sh)
    n_params = sum(int(np.prod(v.shape)) for p, v in nnx.to_flat_state(state) if p[-1] != "kernel_scale")

    inputs = edit_batch(config, args.batch, args.prompt_tokens)
    key = bucket_key(config, inputs)
    padded = pad_inputs(inputs, 0, length=key.length, batch=key.batch)  # pixel rows: abstract, below
    enc = prepare_inputs(config, padded.input_ids, padded.attention_mask, inputs.image_grid_thw,
                         vision_shape=key.vision)
    pixels = jax.ShapeDtypeStruct((key.vision.num_patches, config.vision_config.patch_dim), jnp.float32)
    enc_sh, pix_sh = input_shardings(mesh, enc, pixels)
    enc = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=s), enc, enc_sh)
    pixels = jax.ShapeDtypeStruct(pixels.shape, pixels.dtype, sharding=pix_sh)

    fn = make_encode_fn(graphdef, key.drop_idx)
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(state, enc, pixels)
        jaxpr = jax.make_jaxpr(fn)(state, enc, pixels).jaxpr
    t1 = time.perf_counter()
    arg_bytes = sum(shard_bytes(x) for x in jax.tree.leaves((state, enc, pixels)))
    sizes, peak, _, oom = compile_memory(lowered, arg_bytes)
    t2 = time.perf_counter()
    flops = count_flops(jaxpr)
    n_dev = len(devices)
    weights = sum(shard_bytes(x) for x in jax.tree.leaves(state))
    t = config.text_config
    local_rows = max(1, key.batch // n_dev)
    lm_scores = local_rows * t.num_attention_heads * key.length ** 2 * 4  # fp32 [B, H, L, L] of one layer
    return {
        "benchmark": "text_encoder_memory_plan", "topology": args.topology, "devices": n_dev,
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape), "batch": args.batch,
        "image_grids": inputs.image_grid_thw.tolist(), "seq_len": int(inputs.input_ids.shape[1]),
        "bucket": {"batch": key.batch, "length": key.length, "num_patches": key.vision.num_patches,
                   "num_windows": key.vision.num_windows, "num_frames": key.vision.num_frames,
                   "frame_len": key.vision.frame_len},
        "image_patches": int(np.prod(inputs.image_grid_thw, axis=1).sum()),
        "vision_attention": args.vision_attention, "dtype": args.dtype, "quantize": args.quantize,
        "params": n_params,
        "weights_bytes_per_device": weights, "argument_bytes": sizes["argument"], "output_bytes": sizes["output"],
        "alias_bytes": sizes["alias"], "temp_bytes": sizes["temp"], "peak_bytes_per_device": int(peak),
        "peak_gib_per_device": peak / GiB, "compile_oom": oom is not None, "hbm_gib": chip.hbm_gib,
        "budget_gib": chip.budget_gib, "fits": oom is None and peak / GiB <= chip.budget_gib,
        "lm_attention_scores_gib_per_layer_per_device": lm_scores / GiB,
        "matmul_flops_global": flops["global"], "matmul_flops_local": flops["local"],
        "splash_flops_local": flops["attention"], "lower_s": t1 - t0, "compile_s": t2 - t1,
    }


def table(r: dict) -> str:
    b = r["bucket"]
    rows = [
        ("target", f"{r['topology']} ({r['devices']}× {r['device_kind']}), mesh {r['mesh']}"),
        ("workload", f"Edit, {r['batch']} prompts × one ~1 Mpx image: {r['image_patches']} patches, "
                     f"{r['seq_len']} tokens per row"),
        ("bucket", f"{b['batch']} × {b['length']} tokens; vision {b['num_patches']} patches, {b['num_windows']} "
                   f"windows, {b['num_frames']} images × {b['frame_len']}"),
        ("model", f"{r['params']:,} params ({r['dtype']}{', ' + r['quantize'] + ' kernels' if r['quantize'] else ''}"
                  f"), vision attention {r['vision_attention']}, LM causal attention plain XLA"),
        ("weights / chip", f"{r['weights_bytes_per_device'] / GiB:.2f} GiB"),
        ("args / temp / out", f"{r['argument_bytes'] / GiB:.2f} / {r['temp_bytes'] / GiB:.2f} / "
                              f"{r['output_bytes'] / GiB:.2f} GiB"),
        ("peak / chip", f"{'≥ ' if r['compile_oom'] else ''}{r['peak_gib_per_device']:.2f} GiB of {r['hbm_gib']:.0f} "
                        f"(budget {r['budget_gib']:.0f}: {'fits' if r['fits'] else 'DOES NOT FIT'})"),
        ("LM scores / layer", f"{r['lm_attention_scores_gib_per_layer_per_device']:.2f} GiB fp32 per chip"),
        ("matmul TFLOP", f"{r['matmul_flops_global'] / 1e12:.1f} global (upper bound) + "
                         f"{(r['matmul_flops_local'] + r['splash_flops_local']) / 1e12:.2f} per chip in kernels"),
        ("lower / compile", f"{r['lower_s']:.1f} s / {r['compile_s']:.1f} s"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = plan(args)
    print(table(result))
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
