"""Prompt-encoder preprocessing without torch: Qwen2 tokenizer (`tokenizers`), Qwen2-VL image processor
(numpy/PIL), the Qwen-Image pipelines' templates and image sizing, and the hidden-state post-processing."""

from .image_processor import ImageInputs, ImageProcessorConfig, QwenImageProcessor, smart_resize
from .postprocess import (
    bucket_length, extract_masked_hidden, mask_or_none, pad_inputs, prompt_embeds_from_hidden, trim_to_longest,
)
from .processor import ProcessorOutput, QwenVLProcessor
from .prompts import (
    CONDITION_IMAGE_SIZE, TEMPLATES, VAE_IMAGE_SIZE, PromptTemplate, TextEncoderInputs, build_inputs,
    calculate_dimensions, condition_image, condition_image_size, format_prompt, output_size, vae_image,
    vae_image_size,
)
from .tokenizer import Encoding, QwenTokenizer

__all__ = [
    "CONDITION_IMAGE_SIZE", "Encoding", "ImageInputs", "ImageProcessorConfig", "ProcessorOutput", "PromptTemplate",
    "QwenImageProcessor", "QwenTokenizer", "QwenVLProcessor", "TEMPLATES", "TextEncoderInputs", "VAE_IMAGE_SIZE",
    "bucket_length", "build_inputs", "calculate_dimensions", "condition_image", "condition_image_size",
    "extract_masked_hidden", "format_prompt", "mask_or_none", "output_size", "pad_inputs",
    "prompt_embeds_from_hidden", "smart_resize", "trim_to_longest", "vae_image", "vae_image_size",
]
