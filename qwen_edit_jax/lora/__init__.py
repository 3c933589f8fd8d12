"""LoRA files: key styles (`formats`) and import/export/merge against the merged-QKV model (`io`)."""

from .io import LoraWeights, apply_lora, load_lora_into_adapters, read_lora, save_lora  # noqa: F401
