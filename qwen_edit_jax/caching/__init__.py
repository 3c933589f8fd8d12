"""Dataset → training cache (layer 6, beside `training`): the layouts users have, per-file validation,
bucketing as the pipelines size images, batched encoding on every device and host, resumable writing.

`train/cache_dataset.py` is the command line; `cache_dataset` the function behind it.
"""

from .buckets import Sizing, SizeError, reference_vae_size, target_size
from .layouts import LayoutError, Listing, Problem, RawSample, read_dataset
from .run import BadInput, CacheOptions, CacheResult, Encoders, cache_dataset, check_dataset, read_variant
from .validate import BadImage, GoodSample, Report, format_report, load_image
from .writer import CacheExists, PartialCache, partial_path

__all__ = [
    "BadImage", "BadInput", "CacheExists", "CacheOptions", "CacheResult", "Encoders", "GoodSample", "LayoutError",
    "Listing", "PartialCache", "Problem", "RawSample", "Report", "SizeError", "Sizing", "cache_dataset",
    "check_dataset", "format_report", "load_image", "partial_path", "read_dataset", "read_variant",
    "reference_vae_size", "target_size",
]
