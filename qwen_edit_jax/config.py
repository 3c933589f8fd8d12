"""Model configuration: the diffusers `transformer/config.json` fields, presets, and runtime options.

`DiTConfig` describes the weights (what a checkpoint contains); `ModelOptions` describes how to run
them (dtypes, scan, remat, attention kernel, QKV layout, LoRA). Keeping the two apart lets one
checkpoint be run many ways.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Literal

import jax.numpy as jnp

# Keys found in released config.json files that carry no meaning for the model.
_IGNORED_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "pooled_projection_dim"}
# Keys of other Qwen-Image variants that this port does not implement (Qwen-Image-Layered).
_UNSUPPORTED_TRUE_KEYS = {"use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"}


def read_json_config(path: str | os.PathLike, what: str = "config") -> tuple[dict[str, Any], str]:
    """A diffusers/transformers `config.json` (a file, or a folder holding one) as a dict, and its path."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path) as f:
            d = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return d, path


def build_config(cls: type, d: dict[str, Any], *, ignored: set[str], source: str) -> Any:
    """`cls(**d)` for a config dataclass: `ignored` keys dropped, unknown keys and bad values one error naming `source`."""
    d = {k: v for k, v in d.items() if k not in ignored}
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"{source}: unknown config keys {unknown}; expected a subset of {sorted(names)}")
    try:
        return cls(**d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture of `QwenImageTransformer2DModel`; field names equal diffusers' config keys."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, int, int] = (16, 56, 56)
    zero_cond_t: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        problems = []
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            problems.append(
                f"axes_dims_rope {list(self.axes_dims_rope)} must sum to attention_head_dim {self.attention_head_dim}"
            )
        if any(a % 2 for a in self.axes_dims_rope):
            problems.append(f"axes_dims_rope {list(self.axes_dims_rope)} must all be even")
        if self.in_channels != self.patch_size**2 * (self.in_channels // self.patch_size**2):
            problems.append(f"in_channels {self.in_channels} must be a multiple of patch_size^2")
        for name in ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be positive, got {getattr(self, name)}")
        if problems:
            raise ValueError("Invalid DiTConfig: " + "; ".join(problems))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_features(self) -> int:
        """Width of `proj_out`: one packed latent patch."""
        return self.patch_size * self.patch_size * self.out_channels

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "DiTConfig":
        d = dict(d)
        for key in _UNSUPPORTED_TRUE_KEYS:
            if d.pop(key, False):
                raise ValueError(f"{source}: `{key}: true` is not supported (Qwen-Image-Layered / guidance models)")
        if d.get("out_channels") is None:
            d.pop("out_channels", None)
        return build_config(cls, d, ignored=_IGNORED_KEYS, source=source)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "DiTConfig":
        """Read a diffusers `config.json` (a file, or a folder holding one)."""
        d, path = read_json_config(path)
        return cls.from_dict(d, source=path)

    def to_dict(self) -> dict[str, Any]:
        """The diffusers `config.json` content for these weights."""
        d = dataclasses.asdict(self)
        d["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": "QwenImageTransformer2DModel", **d, "guidance_embeds": False}

    def to_json(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")


_FULL = DiTConfig()
PRESETS: dict[str, DiTConfig] = {
    "qwen-image": _FULL,
    "qwen-image-edit": _FULL,
    "qwen-image-edit-2509": _FULL,
    "qwen-image-edit-2511": dataclasses.replace(_FULL, zero_cond_t=True),
    # Tiny, shape-compatible with the real model (in 64 / out 16 latent channels), for tests and demos.
    "tiny": DiTConfig(
        num_layers=2,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        axes_dims_rope=(8, 12, 12),
    ),
}


def preset(name: str) -> DiTConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


RematPolicy = Literal["none", "full", "save_matmuls"]
AttentionImpl = Literal["auto", "xla", "chunked", "flash", "cudnn", "splash"]
ATTENTION_KERNELS: tuple[str, ...] = AttentionImpl.__args__  # the built-in names in models.kernels
QKVMode = Literal["split", "shared"]
QuantizeMode = Literal["int8", "fp8", "int4"]
QUANTIZE_MODES: tuple[str, ...] = QuantizeMode.__args__
OffloadMode = Literal["none", "base"]
# written-out backward passes (models/dit/layers.py): "lora" = `lora_delta`'s VJP, "gelu" = tanh-GELU's derivative
CustomGrad = Literal["lora", "gelu"]
CUSTOM_GRADS: tuple[str, ...] = CustomGrad.__args__
# int4 scales are per group of this many input rows (one per output column and group); int8 / fp8 use one
# scale per output column. 64 and 128 compared in docs/results.md: 64 cuts the int4 error by a fifth for
# 0.6 GB more scales on the 20.4B model.
INT4_GROUP_SIZE = 64


def quant_group_size(mode: str, in_features: int) -> int:
    """Input rows sharing one scale: all of them for int8 / fp8, `INT4_GROUP_SIZE` for int4.

    An input width that the group size does not divide (only tiny test models) falls back to one group.
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)} or None, got {mode!r}")
    if mode == "int4" and in_features % INT4_GROUP_SIZE == 0:
        return INT4_GROUP_SIZE
    return in_features


def quant_scale_rows(mode: str, in_features: int) -> int:
    """Rows of a kernel's scale along its input axis: the number of groups."""
    return in_features // quant_group_size(mode, in_features)

DEFAULT_LORA_TARGETS = ("to_qkv", "add_qkv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp")


AdapterType = Literal["lora", "dora", "lokr"]
ADAPTER_TYPES: tuple[str, ...] = AdapterType.__args__


def _pattern_items(value: Any, what: str, cast: type) -> tuple[tuple[str, Any], ...]:
    """A `{regex: value}` mapping (or its items) as a sorted-by-insertion tuple of pairs (hashable, frozen)."""
    items = tuple(value.items()) if isinstance(value, dict) else tuple(tuple(kv) for kv in value)
    out = []
    for key, v in items:
        try:
            re.compile(key)
        except re.error as e:
            raise ValueError(f"LoRA {what}: {key!r} is not a regular expression ({e})") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (cast is int and v != int(v)):
            raise ValueError(f"LoRA {what}[{key!r}]={v!r}: must be a positive {cast.__name__}")
        out.append((str(key), cast(v)))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """Which linears carry trainable adapters, of which kind, and how big.

    `targets` are module names as in the model (`to_qkv`, `add_qkv_proj`, `to_out`, `to_add_out`,
    `img_mlp`/`txt_mlp` = both MLP linears, `img_mlp.fc1` … for one, `img_mod`, `txt_mod`).
    `qkv_mode="split"` gives each of q, k, v its own rank-r adapter (exactly a standard LoRA);
    `"shared"` uses one A for all three (the original merged-QKV PyTorch parameterisation).

    `type`: "lora" (ΔW = s·B·A), "dora" (PEFT's weight-decomposed LoRA: W' = m·(W + s·B·A)/‖W + s·B·A‖,
    norm per output row) or "lokr" (LyCORIS: ΔW = kron(w1, w2), factor sizes from `lokr_factor`).
    `include` / `exclude` (regular expressions, `re.search`) and `rank_pattern` / `alpha_pattern`
    (`{regex: value}`, PEFT's matching rule, see `lora.plan`) act on diffusers module names such as
    `transformer_blocks.12.attn.to_q`; they need the per-layer `plan` that
    `qwen_edit_jax.lora.resolve_lora_config(lora, num_layers)` fills in (loading does it).
    """

    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (scale 1)
    targets: tuple[str, ...] = DEFAULT_LORA_TARGETS
    qkv_mode: QKVMode = "split"
    type: AdapterType = "lora"
    lokr_factor: int = -1  # LyCORIS `factor`: -1 = the most balanced factorisation
    include: tuple[str, ...] = ()  # regexes over diffusers module names; empty = every targeted module
    exclude: tuple[str, ...] = ()
    rank_pattern: tuple[tuple[str, int], ...] = ()  # also accepts a dict {regex: rank}
    alpha_pattern: tuple[tuple[str, float], ...] = ()  # also accepts a dict {regex: alpha}
    # resolved per-layer adapters, by model linear name ("to_qkv", "img_mlp.fc1" …): ranks[layer][slot]
    # (0 = none) and alphas[layer][slot]; slot = q/k/v for the fused projections in split mode
    plan: tuple[tuple[str, tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]], ...] | None = None

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "rank_pattern", _pattern_items(self.rank_pattern, "rank_pattern", int))
        object.__setattr__(self, "alpha_pattern", _pattern_items(self.alpha_pattern, "alpha_pattern", float))
        if self.rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.rank}")
        if self.qkv_mode not in QKVMode.__args__:
            raise ValueError(f"LoRA qkv_mode must be 'split' or 'shared', got {self.qkv_mode!r}")
        if self.type not in ADAPTER_TYPES:
            raise ValueError(f"LoRA type must be one of {list(ADAPTER_TYPES)}, got {self.type!r}")
        if self.type != "lora" and self.qkv_mode != "split":
            raise ValueError(f"LoRA type {self.type!r} needs qkv_mode='split', got {self.qkv_mode!r}")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"LoRA lokr_factor must be -1 or positive, got {self.lokr_factor}")
        for what in ("include", "exclude"):
            for pat in getattr(self, what):
                try:
                    re.compile(pat)
                except re.error as e:
                    raise ValueError(f"LoRA {what}: {pat!r} is not a regular expression ({e})") from None
        if self.has_patterns and self.qkv_mode != "split":
            raise ValueError("LoRA include/exclude/rank_pattern/alpha_pattern need qkv_mode='split'")
        if self.type == "lokr" and (self.rank_pattern or self.alpha_pattern):
            raise ValueError("LoRA rank_pattern/alpha_pattern are for type lora/dora (LoKr: use include/exclude)")
        known = {"to_qkv", "add_qkv_proj", "to_out", "to_add_out", "img_mlp", "txt_mlp", "img_mod", "txt_mod"}
        known |= {f"{m}.{f}" for m in ("img_mlp", "txt_mlp") for f in ("fc1", "fc2")}
        bad = [t for t in self.targets if t not in known]
        if bad:
            raise ValueError(f"unknown LoRA targets {bad}; choose from {sorted(known)}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank

    @property
    def has_patterns(self) -> bool:
        """True if include / exclude / rank_pattern / alpha_pattern make adapters differ per module or layer."""
        return bool(self.include or self.exclude or self.rank_pattern or self.alpha_pattern)

    def targets_module(self, name: str) -> bool:
        """True if the model linear `name` (e.g. 'img_mlp.fc1', 'to_qkv') gets an adapter."""
        return name in self.targets or name.split(".")[0] in self.targets

    def plan_for(self, name: str) -> tuple[tuple[tuple[int, ...], ...], tuple[tuple[float, ...], ...]] | None:
        """(ranks[layer][slot], alphas[layer][slot]) of the model linear `name`; None without patterns."""
        if not self.has_patterns:
            return None
        if self.plan is None:
            raise ValueError("LoraConfig with include/exclude/rank_pattern/alpha_pattern needs its per-layer plan: "
                             "pass it through qwen_edit_jax.lora.resolve_lora_config(lora, num_layers) first")
        for key, ranks, alphas in self.plan:
            if key == name:
                return ranks, alphas
        return (), ()  # resolved: no adapter on this linear in any layer


_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}
DTYPE_NAMES: tuple[str, ...] = tuple(_DTYPES)  # the dtype names `as_dtype` (and every config) accepts


def as_dtype(d: Any) -> jnp.dtype:
    """Accept 'bf16', 'float32', jnp.bfloat16 … and return a numpy dtype."""
    if isinstance(d, str):
        try:
            return jnp.dtype(_DTYPES[d.lower()])
        except KeyError:
            raise ValueError(f"unknown dtype {d!r}; use one of {sorted(_DTYPES)}") from None
    return jnp.dtype(d)


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the weights are run. Changing these never changes which weights exist (except `lora`)."""

    param_dtype: Any = jnp.float32  # storage dtype of the frozen weights
    dtype: Any = jnp.float32  # activation / matmul-input dtype; norms, RoPE and softmax stay fp32
    scan_layers: bool = True  # lax.scan over stacked blocks (compile time independent of depth)
    remat: RematPolicy = "none"
    attention: AttentionImpl = "auto"  # per platform: splash (TPU), cudnn (GPU, bf16/fp16), else flash
    fuse_qkv: bool = True  # False: six separate q/k/v projections (benchmark baseline only)
    lora: LoraConfig | None = None
    # weight-only quantized frozen base: the block linears' kernels stored as int8 / fp8 (e4m3) values with
    # per-output-channel fp32 scales, or int4 with per-group scales (models/quant.py); other leaves stay in
    # `param_dtype`
    quantize: QuantizeMode | None = None
    # "base": the blocks' frozen weights live in host memory and stream to the device one layer at a time
    # inside the scan (models/offload.py); the backward recomputes each layer (full remat of the blocks)
    offload: OffloadMode = "none"
    # which written-out backward passes replace autodiff: a tuple of CUSTOM_GRADS, or "auto" = the set measured to
    # pay off on the platform the step is traced for (models/dit/layers.py `CUSTOM_GRADS_BY_PLATFORM`)
    custom_grads: Literal["auto"] | tuple[CustomGrad, ...] = "auto"

    def __post_init__(self):
        if self.custom_grads != "auto":
            grads = (self.custom_grads,) if isinstance(self.custom_grads, str) else tuple(self.custom_grads)
            if not set(grads) <= set(CUSTOM_GRADS):
                raise ValueError(f"custom_grads must be 'auto' or a tuple of {list(CUSTOM_GRADS)}, "
                                 f"got {self.custom_grads!r}")
            object.__setattr__(self, "custom_grads", tuple(sorted(set(grads))))
        object.__setattr__(self, "param_dtype", as_dtype(self.param_dtype))
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ValueError(f"quantize must be None or one of {list(QUANTIZE_MODES)}, got {self.quantize!r}")
        if self.offload not in OffloadMode.__args__:
            raise ValueError(f"offload must be one of {list(OffloadMode.__args__)}, got {self.offload!r}")
        if self.offload == "base" and not self.scan_layers:
            raise ValueError("offload='base' streams the stacked blocks inside the layer scan: needs scan_layers=True")
        if self.offload == "base" and self.remat == "save_matmuls":
            raise ValueError("offload='base' recomputes each block in the backward (full remat); "
                             "remat='save_matmuls' would keep every layer's activations: use remat='full'")
        if self.quantize is not None and not self.fuse_qkv:
            raise ValueError("quantize is implemented on the fused-QKV layout only (fuse_qkv=True)")
        object.__setattr__(self, "dtype", as_dtype(self.dtype))
        if self.remat not in RematPolicy.__args__:
            raise ValueError(f"remat must be one of {list(RematPolicy.__args__)}, got {self.remat!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {list(ATTENTION_KERNELS)}, got {self.attention!r}")
        if self.lora is not None and not self.fuse_qkv:
            raise ValueError("LoRA is implemented on the fused-QKV layout only (fuse_qkv=True)")
        if self.lora is not None and self.lora.type == "dora" and (self.quantize or self.offload != "none"):
            raise ValueError("LoRA type 'dora' needs the base weights' row norms on the device: not supported with "
                             "a quantized (quantize) or offloaded (offload='base') base; use type 'lora' or 'lokr'")
