"""The loading layer: checkpoint files (`weights/`) → models (`models/`) → devices (`parallel/`)."""

from .dit import (
    array_from_lazy,
    init_lora,
    iter_torch_params,
    load_transformer,
    model_from_params,
    model_params,
    place_params,
    save_transformer,
)

__all__ = ["array_from_lazy", "init_lora", "iter_torch_params", "load_transformer", "model_from_params",
           "model_params", "place_params", "save_transformer"]
