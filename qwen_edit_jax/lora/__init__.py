"""LoRA: key styles (`formats`), files (`files`), merging into base weights (`merge`), trainable adapters (`adapters`)."""

from .adapters import (
           iter_adapter_records,
           iter_adapter_weights,
           load_lora_into_adapters,
           lora_tensors,
           save_lora,
           write_lora_tensors,
)
from .files import DoraWeights, LokrWeights, LoraFile, LoraWeights, is_lora_file, read_lora, read_lora_file
from .merge import apply_lora
from .plan import resolve_lora_config, resolve_options

__all__ = [
           "DoraWeights",
           "LokrWeights",
           "LoraFile",
           "LoraWeights",
           "apply_lora",
           "is_lora_file",
           "iter_adapter_records",
           "iter_adapter_weights",
           "load_lora_into_adapters",
           "lora_tensors",
           "read_lora",
           "read_lora_file",
           "resolve_lora_config",
           "resolve_options",
           "save_lora",
           "write_lora_tensors",
]
