"""Which block linears get adapters, and how big: `lora.include` / `exclude` / `rank_pattern` / `alpha_pattern`
over diffusers module names → the per-layer plan `LoraConfig.plan` that the model is built from.

The blocks are stacked and scanned, so an adapter has one shape in every layer: the largest rank of its layers,
with a per-layer rank mask and scale (`models.dit.layers.Linear`). Matching follows PEFT: `include` / `exclude`
use `re.search`; a `rank_pattern` / `alpha_pattern` key matches a module name `m` when
`re.match(rf"(.*\\.)?({key})$", m)` (`peft.utils.other.get_pattern_key`), the first matching key wins.
"""

from __future__ import annotations

import dataclasses
import re

from ..config import DiTConfig, LoraConfig, ModelOptions
from ..weights import keymap


def pattern_value(patterns: tuple[tuple[str, float], ...], module: str) -> float | None:
    """The value of the first `(regex, value)` whose regex matches `module` by PEFT's rule, else None."""
    for key, value in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def module_selected(lora: LoraConfig, module: str) -> bool:
    """`include` (any matches, or empty) and no `exclude` matches, by `re.search` over the diffusers name."""
    if lora.include and not any(re.search(p, module) for p in lora.include):
        return False
    return not any(re.search(p, module) for p in lora.exclude)


def _linear_name(flax_path: str) -> str:
    """'transformer_blocks.attn.to_qkv' → 'to_qkv', 'transformer_blocks.img_mlp.fc1' → 'img_mlp.fc1'."""
    rel = flax_path.removeprefix(keymap.BLOCKS + ".")
    return rel.removeprefix("attn.")


def resolve_lora_config(lora: LoraConfig, num_layers: int) -> LoraConfig:
    """`lora` with its per-layer `plan` filled from include / exclude / rank_pattern / alpha_pattern (unchanged
    when it has none). Each targeted block linear gets ranks[layer][slot] (0: no adapter) and alphas."""
    if not lora.has_patterns:
        return lora
    plan = []
    for entry in keymap.module_entries(fuse_qkv=True):
        if entry.kind != "linear" or not entry.stacked:
            continue
        name = _linear_name(entry.flax)
        if not lora.targets_module(name):
            continue
        ranks, alphas = [], []
        for layer in range(num_layers):
            r_row, a_row = [], []
            for module in entry.torch_modules(layer):
                if not module_selected(lora, module):
                    r_row.append(0)
                    a_row.append(0.0)
                    continue
                r = int(pattern_value(lora.rank_pattern, module) or lora.rank)
                a = pattern_value(lora.alpha_pattern, module)
                r_row.append(r)
                a_row.append(float(a if a is not None else (lora.alpha if lora.alpha is not None else r)))
            ranks.append(tuple(r_row))
            alphas.append(tuple(a_row))
        plan.append((name, tuple(ranks), tuple(alphas)))
    if not any(r for _, ranks, _ in plan for row in ranks for r in row):
        raise ValueError(f"LoRA include={list(lora.include)} / exclude={list(lora.exclude)} select no module of "
                         f"targets {list(lora.targets)} (names like transformer_blocks.0.attn.to_q)")
    return dataclasses.replace(lora, plan=tuple(plan))


def resolve_options(options: ModelOptions, config: DiTConfig) -> ModelOptions:
    """`options` with `options.lora` resolved for `config`'s number of layers (see `resolve_lora_config`)."""
    if options.lora is None or not options.lora.has_patterns:
        return options
    return dataclasses.replace(options, lora=resolve_lora_config(options.lora, config.num_layers))
