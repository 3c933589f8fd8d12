"""The one key map for the Qwen-Image VAE: checkpoint tensor names ⇄ Flax paths of the 2D image network.

One walk over the architecture (`vae_keys`) yields, for every tensor of diffusers'
`AutoencoderKLQwenImage`, its diffusers name, its original Wan-2.1 name (what ComfyUI single-file
VAEs such as `qwen_image_vae.safetensors` use), its torch shape, and the Flax path it loads into.

Flax paths equal the diffusers names except: conv `weight` → `kernel`, and `resample.1` (the conv
behind the pad / upsample in diffusers' `nn.Sequential`) → `resample`.

Tensor layouts (`to_flax`):
- causal 3D conv weight OIDHW → HWIO of the LAST temporal tap `W[:, :, -1]` (for a single frame the
  causal padding puts two zero frames before the image, so the other taps only ever see zeros);
- 2D conv weight OIHW → HWIO; RMS-norm `gamma` [C, 1, 1(, 1)] → [C]; biases unchanged.
`from_flax` is the inverse (for writing checkpoints): the 2D kernel goes into the last temporal tap,
the other taps are zero, so diffusers' 3D VAE computes the same on single frames.

Unused for images: the temporal resamplers' `time_conv` (weight + bias, in the encoder's
`downsample3d` and the decoder's `upsample3d` blocks). diffusers skips them on the first chunk, which
is all a single frame ever is. They are accepted in a file (shape-checked) and never loaded; a file
without them loads too.

This module knows names and shapes only; it never imports the models (the architecture arrives as
any object with the `VAEArch` fields, e.g. `models.vae.VAEConfig`).
"""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from typing import Iterable, Literal, Protocol, Sequence

import numpy as np

from ..errors import CheckpointError

Layout = Literal["diffusers", "original"]
ANCHORS: dict[Layout, str] = {"diffusers": "encoder.conv_in.weight", "original": "encoder.conv1.weight"}


class VAEArch(Protocol):
    base_dim: int
    z_dim: int
    dim_mult: Sequence[int]
    num_res_blocks: int
    temperal_downsample: Sequence[bool]
    input_channels: int


@dataclasses.dataclass(frozen=True)
class VAEKey:
    name: str  # diffusers tensor name
    original: str  # Wan-2.1 / ComfyUI tensor name
    shape: tuple[int, ...]  # torch shape in the checkpoint
    flax: str | None  # dotted Flax path; None = not used for images (time_conv)

    def source_name(self, layout: Layout) -> str:
        return self.name if layout == "diffusers" else self.original


# ---- the architecture walk -------------------------------------------------------------------------
class _Walk:
    def __init__(self) -> None:
        self.keys: list[VAEKey] = []

    def _add(self, name: str, orig: str, shape: tuple[int, ...], flax: str | None) -> None:
        self.keys.append(VAEKey(name, orig, tuple(int(s) for s in shape), flax))

    def conv(self, d: str, o: str, cin: int, cout: int, k: int, *, causal: bool, flax: str | None = None,
             used: bool = True) -> None:
        """A conv module: weight [O, I, (k,) k, k] (5-D when causal 3D) and bias [O]."""
        f = (flax or d) if used else None
        self._add(f"{d}.weight", f"{o}.weight", (cout, cin, *((k,) if causal else ()), k, k),
                  f and f"{f}.kernel")
        self._add(f"{d}.bias", f"{o}.bias", (cout,), f and f"{f}.bias")

    def norm(self, d: str, o: str, dim: int, *, images: bool) -> None:
        self._add(f"{d}.gamma", f"{o}.gamma", (dim, 1, 1) if images else (dim, 1, 1, 1), f"{d}.gamma")

    def resnet(self, d: str, o: str, cin: int, cout: int) -> None:
        self.norm(f"{d}.norm1", f"{o}.residual.0", cin, images=False)
        self.conv(f"{d}.conv1", f"{o}.residual.2", cin, cout, 3, causal=True)
        self.norm(f"{d}.norm2", f"{o}.residual.3", cout, images=False)
        self.conv(f"{d}.conv2", f"{o}.residual.6", cout, cout, 3, causal=True)
        if cin != cout:
            self.conv(f"{d}.conv_shortcut", f"{o}.shortcut", cin, cout, 1, causal=True)

    def attention(self, d: str, o: str, dim: int) -> None:
        self.norm(f"{d}.norm", f"{o}.norm", dim, images=True)
        self.conv(f"{d}.to_qkv", f"{o}.to_qkv", dim, 3 * dim, 1, causal=False)
        self.conv(f"{d}.proj", f"{o}.proj", dim, dim, 1, causal=False)

    def mid(self, d: str, o: str, dim: int) -> None:
        self.resnet(f"{d}.resnets.0", f"{o}.0", dim, dim)
        self.attention(f"{d}.attentions.0", f"{o}.1", dim)
        self.resnet(f"{d}.resnets.1", f"{o}.2", dim, dim)

    def resample(self, d: str, o: str, dim: int, mode: str) -> None:
        up = mode.startswith("upsample")
        self.conv(f"{d}.resample.1", f"{o}.resample.1", dim, dim // 2 if up else dim, 3, causal=False,
                  flax=f"{d}.resample")
        if mode.endswith("3d"):  # (3, 1, 1) temporal kernel: never runs on a single frame
            self._add(f"{d}.time_conv.weight", f"{o}.time_conv.weight", (2 * dim if up else dim, dim, 3, 1, 1), None)
            self._add(f"{d}.time_conv.bias", f"{o}.time_conv.bias", (2 * dim if up else dim,), None)


def vae_keys(arch: VAEArch) -> list[VAEKey]:
    """Every tensor of `AutoencoderKLQwenImage(**arch)`, in module order."""
    w = _Walk()
    mult, n_res, z = list(arch.dim_mult), int(arch.num_res_blocks), int(arch.z_dim)
    last = len(mult) - 1
    # encoder
    dims = [arch.base_dim * m for m in [1] + mult]
    w.conv("encoder.conv_in", "encoder.conv1", arch.input_channels, dims[0], 3, causal=True)
    n = 0
    for i, (cin, cout) in enumerate(pairwise(dims)):
        for _ in range(n_res):
            w.resnet(f"encoder.down_blocks.{n}", f"encoder.downsamples.{n}", cin, cout)
            cin, n = cout, n + 1
        if i != last:
            mode = "downsample3d" if arch.temperal_downsample[i] else "downsample2d"
            w.resample(f"encoder.down_blocks.{n}", f"encoder.downsamples.{n}", cout, mode)
            n += 1
    w.mid("encoder.mid_block", "encoder.middle", dims[-1])
    w.norm("encoder.norm_out", "encoder.head.0", dims[-1], images=False)
    w.conv("encoder.conv_out", "encoder.head.2", dims[-1], 2 * z, 3, causal=True)
    # latent 1×1 convs
    w.conv("quant_conv", "conv1", 2 * z, 2 * z, 1, causal=True)
    w.conv("post_quant_conv", "conv2", z, z, 1, causal=True)
    # decoder (the original names its up blocks' layers in one flat list)
    dims = [arch.base_dim * m for m in [mult[-1]] + mult[::-1]]
    t_up = list(arch.temperal_downsample)[::-1]
    w.conv("decoder.conv_in", "decoder.conv1", z, dims[0], 3, causal=True)
    w.mid("decoder.mid_block", "decoder.middle", dims[0])
    k = 0
    for i, (cin, cout) in enumerate(pairwise(dims)):
        cin = cin // 2 if i > 0 else cin
        for j in range(n_res + 1):
            w.resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.upsamples.{k}", cin, cout)
            cin, k = cout, k + 1
        if i != last:
            mode = "upsample3d" if t_up[i] else "upsample2d"
            w.resample(f"decoder.up_blocks.{i}.upsamplers.0", f"decoder.upsamples.{k}", cout, mode)
            k += 1
    w.norm("decoder.norm_out", "decoder.head.0", dims[-1], images=False)
    w.conv("decoder.conv_out", "decoder.head.2", dims[-1], arch.input_channels, 3, causal=True)
    return w.keys


# ---- tensors ---------------------------------------------------------------------------------------
def to_flax(key: VAEKey, value: np.ndarray) -> np.ndarray:
    """A checkpoint tensor (torch layout) → the Flax parameter (see the module docstring)."""
    if key.name.endswith(".gamma"):
        return value.reshape(-1)
    if value.ndim == 5:  # causal 3D conv: the last temporal tap
        value = value[:, :, -1]
    if value.ndim == 4:
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    return value


def from_flax(key: VAEKey, value: np.ndarray | None) -> np.ndarray:
    """A Flax parameter → the checkpoint tensor (torch layout, `key.shape`); inverse of `to_flax`.

    Causal 3D conv kernels get the 2D kernel in their last temporal tap and zeros in the others;
    a key unused for images (`key.flax is None`, the `time_conv`s) gets zeros (pass `value=None`).
    """
    if key.flax is None:
        return np.zeros(key.shape, np.asarray(value).dtype if value is not None else np.float32)
    if value is None:
        raise ValueError(f"{key.name}: no value for the Flax parameter {key.flax!r}")
    value = np.asarray(value)
    if key.name.endswith(".gamma"):
        out = value.reshape(key.shape)
    elif value.ndim == 4:  # HWIO → OIHW (+ a temporal axis for causal 3D convs)
        oihw = value.transpose(3, 2, 0, 1)
        if len(key.shape) == 5:
            out = np.zeros(key.shape, value.dtype)
            out[:, :, -1] = oihw
        else:
            out = oihw
    else:
        out = value
    if tuple(out.shape) != key.shape:
        raise ValueError(f"{key.name}: Flax parameter {key.flax!r} of shape {list(value.shape)} does not give the "
                         f"checkpoint shape {list(key.shape)}")
    return np.ascontiguousarray(out)


def detect_layout(names: Iterable[str], source: str) -> tuple[Layout, str]:
    """('diffusers' | 'original', prefix) from the tensor names: diffusers has `encoder.conv_in.weight`,
    the Wan-2.1 original / ComfyUI `encoder.conv1.weight`; a prefix such as `vae.` or
    `first_stage_model.` (a VAE inside a bigger file) is detected and stripped."""
    found: list[tuple[Layout, str]] = []
    for name in names:
        for layout, anchor in ANCHORS.items():
            if name == anchor or name.endswith("." + anchor):
                found.append((layout, name[: len(name) - len(anchor)]))
    if not found:
        raise CheckpointError(f"{source}: no VAE tensors found (expected {ANCHORS['diffusers']!r} for diffusers "
                              f"or {ANCHORS['original']!r} for Wan-2.1 / ComfyUI names)")
    if len(set(found)) > 1:
        raise CheckpointError(f"{source}: ambiguous VAE layout, found {sorted(p + ANCHORS[lay] for lay, p in found)}")
    return found[0]


def match_keys(names: Iterable[str], arch: VAEArch, layout: Layout, prefix: str = "",
               ) -> tuple[dict[str, VAEKey], list[VAEKey], list[str]]:
    """Pair checkpoint names with the key map: ({stored name: key}, missing keys, extra names).

    Missing excludes the optional (unused) `time_conv` tensors. With a prefix, names outside it
    belong to other models in the same file and are neither matched nor extra.
    """
    table = {prefix + k.source_name(layout): k for k in vae_keys(arch)}
    matched, extra = {}, []
    for name in names:
        if not name.startswith(prefix):
            continue
        if name in table:
            matched[name] = table[name]
        else:
            extra.append(name)
    found = {k.name for k in matched.values()}
    missing = [k for k in table.values() if k.flax is not None and k.name not in found]
    return matched, missing, extra
