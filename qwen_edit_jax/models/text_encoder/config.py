"""Configuration of the Qwen2.5-VL encoder, mirroring transformers' `Qwen2_5_VLConfig`.

Dataclass defaults are Qwen2.5-VL-7B-Instruct, the Qwen-Image(-Edit) text encoder. `from_dict`
reads a `config.json` in either layout transformers has written:

- transformers ≥ 5: `text_config` / `vision_config` nested, RoPE in `rope_parameters`;
- transformers 4.x: the text fields at the top level (sometimes also copied into `text_config`),
  RoPE in `rope_scaling` + `rope_theta`, vision `in_chans`.

Size fields must be present (a missing one raises); behavioural fields missing from the file
take transformers' defaults, so the model is the one transformers would build from that file.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh", "quick_gelu")
ENCODER_QUANT_MODES = ("int8", "fp8")  # weight-only modes of `models/quant.py` with per-channel scales


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """`Qwen2_5_VLVisionConfig`: the ViT (14-px patches × 2 frames, window attention, 2×2 merger)."""

    depth: int = 32
    hidden_size: int = 1280
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112  # pixels; windows are window_size // patch_size // spatial_merge_size merged cells wide
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch (`pixel_values` row): C·T·P·P = 1176."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_cells(self) -> int:
        """Window side in merged cells (`vit_merger_window_size`)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def validate(self) -> None:
        if self.hidden_size % self.num_heads or self.head_dim % 4:
            raise ValueError(f"vision hidden_size {self.hidden_size} / num_heads {self.num_heads} must give a "
                             f"head_dim divisible by 4 (2D RoPE)")
        if self.window_cells < 1:
            raise ValueError(f"vision window_size {self.window_size} is smaller than one merged cell "
                             f"({self.patch_size * self.spatial_merge_size} px)")
        if any(not 0 <= i < self.depth for i in self.fullatt_block_indexes):
            raise ValueError(f"fullatt_block_indexes {list(self.fullatt_block_indexes)} out of range for depth "
                             f"{self.depth}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"vision hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """`Qwen2_5_VLTextConfig`: the Qwen2.5 decoder with M-RoPE (no lm_head here)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    mrope_section: tuple[int, ...] = (16, 24, 24)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                             f"{self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to head_dim/2 = {self.head_dim // 2}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"text hidden_act {self.hidden_act!r} is not supported; use one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class Qwen25VLConfig:
    """`Qwen2_5_VLConfig`: both towers plus the special token ids the forward pass needs."""

    text_config: TextConfig = dataclasses.field(default_factory=TextConfig)
    vision_config: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653

    def __post_init__(self):
        self.text_config.validate()
        self.vision_config.validate()
        if self.vision_config.out_hidden_size != self.text_config.hidden_size:
            raise ValueError(f"vision out_hidden_size {self.vision_config.out_hidden_size} != text hidden_size "
                             f"{self.text_config.hidden_size}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "config") -> "Qwen25VLConfig":
        """Parse a transformers `config.json` dict (either layout); `source` names it in errors."""
        return _parse(d, source)


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """How the weights are run; never changes which weights exist.

    dtype: activations and matmul inputs (norms, RoPE angles and softmax stay fp32).
    param_dtype: storage dtype of the weights. attention: the vision tower's kernel name
    (`models.kernels.get_attention`). remat: recompute each scanned layer in the backward pass.
    quantize: "int8" / "fp8" stores the large linear kernels (language model q/k/v/o and MLP, vision
    qkv/proj/MLP, merger MLP: 99.97% of the weights outside the embedding table) as 8-bit values with
    fp32 per-output-channel scales (`models/quant.py`): the 7B encoder's weights take 8.30 GB instead of
    15.49 (bf16). The embedding table, norms, biases and the patch embedding stay in `param_dtype`.
    """

    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention: str = "xla"
    remat: bool = False
    quantize: str | None = None

    def __post_init__(self):
        if self.quantize is not None and self.quantize not in ENCODER_QUANT_MODES:
            raise ValueError(f"quantize must be None or one of {list(ENCODER_QUANT_MODES)}, got {self.quantize!r}")


# ---------------------------------------------------------------------------------------------
# config.json parsing
# ---------------------------------------------------------------------------------------------
_TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_VISION_REQUIRED = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")
_TEXT_KEYS = _TEXT_REQUIRED + ("num_key_value_heads", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
                               "rope_parameters", "use_sliding_window", "sliding_window", "max_window_layers",
                               "layer_types")


def _require(d: Mapping[str, Any], keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ValueError(f"{where}: missing {missing} (is this a Qwen2.5-VL config.json?)")


def _rope(text: Mapping[str, Any], where: str) -> tuple[float, tuple[int, ...]]:
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "mrope"):
        raise ValueError(f"{where}: rope type {kind!r} is not supported (only default M-RoPE)")
    theta = float(rope.get("rope_theta", text.get("rope_theta", 1e6)))
    return theta, tuple(int(s) for s in rope.get("mrope_section", (16, 24, 24)))


def _check_no_sliding(text: Mapping[str, Any], n_layers: int, where: str) -> None:
    types = text.get("layer_types")
    if types is None and text.get("use_sliding_window") and text.get("sliding_window") is not None:
        types = ["sliding_attention" if i >= text.get("max_window_layers", 80) else "full_attention"
                 for i in range(n_layers)]
    if types and any(t != "full_attention" for t in types):
        raise ValueError(f"{where}: sliding-window attention layers are not supported (layer_types {types})")


def _parse(d: Mapping[str, Any], where: str) -> Qwen25VLConfig:
    if not isinstance(d, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(d).__name__}")
    model_type = d.get("model_type")
    if model_type is not None and model_type != "qwen2_5_vl":
        raise ValueError(f"{where}: model_type {model_type!r} is not 'qwen2_5_vl'")
    nested = d.get("text_config") or {}
    text = {k: d[k] for k in _TEXT_KEYS if k in d}  # transformers 4.x: text fields at the top level
    text.update({k: v for k, v in nested.items() if v is not None or k not in text})
    vision = d.get("vision_config")
    if not isinstance(vision, Mapping):
        raise ValueError(f"{where}: no vision_config (is this a Qwen2.5-VL config.json?)")
    _require(text, _TEXT_REQUIRED, f"{where} text config")
    _require(vision, _VISION_REQUIRED, f"{where} vision_config")
    n_layers = int(text["num_hidden_layers"])
    _check_no_sliding(text, n_layers, where)
    theta, section = _rope(text, where)
    kv = text.get("num_key_value_heads", 8)  # transformers: absent → 8, null → num_attention_heads
    tcfg = TextConfig(
        vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
        intermediate_size=int(text["intermediate_size"]), num_hidden_layers=n_layers,
        num_attention_heads=int(text["num_attention_heads"]),
        num_key_value_heads=int(text["num_attention_heads"] if kv is None else kv),
        hidden_act=str(text.get("hidden_act", "silu")), rms_norm_eps=float(text.get("rms_norm_eps", 1e-5)),
        rope_theta=theta, mrope_section=section)
    patch = vision.get("patch_size", 14)
    if not isinstance(patch, int):
        raise ValueError(f"{where}: vision patch_size {patch!r} must be one integer")
    vrope = vision.get("rope_parameters") or {}
    vcfg = VisionConfig(
        depth=int(vision["depth"]), hidden_size=int(vision["hidden_size"]),
        hidden_act=str(vision.get("hidden_act", "silu")), intermediate_size=int(vision["intermediate_size"]),
        num_heads=int(vision["num_heads"]), in_channels=int(vision.get("in_channels", vision.get("in_chans", 3))),
        patch_size=patch, spatial_merge_size=int(vision.get("spatial_merge_size", 2)),
        temporal_patch_size=int(vision.get("temporal_patch_size", 2)),
        window_size=int(vision.get("window_size", 112)), out_hidden_size=int(vision["out_hidden_size"]),
        fullatt_block_indexes=tuple(int(i) for i in vision.get("fullatt_block_indexes", (7, 15, 23, 31))),
        rope_theta=float(vrope.get("rope_theta", 10000.0)))
    ids = {k: int(d[k]) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
           if d.get(k) is not None}
    try:
        return Qwen25VLConfig(text_config=tcfg, vision_config=vcfg, **ids)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
