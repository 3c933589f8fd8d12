"""Prompt-encoder preprocessing without torch: Qwen2 tokenizer (`tokenizers`), Qwen2-VL image processor
(numpy/PIL), the Qwen-Image pipelines' templates, and the hidden-state post-processing (image sizing:
`qwen_edit_jax.imaging`)."""

from .image_processor import ImageInputs, ImageProcessorConfig, QwenImageProcessor, smart_resize
from .postprocess import (
    bucket_length, extract_masked_hidden, mask_or_none, pad_inputs, prompt_embeds_from_hidden, trim_to_longest,
)
from .processor import ProcessorOutput, QwenVLProcessor
from .prompts import TEMPLATES, PromptTemplate, TextEncoderInputs, build_inputs, format_prompt
from .tokenizer import Encoding, QwenTokenizer

__all__ = [
    "Encoding", "ImageInputs", "ImageProcessorConfig", "ProcessorOutput", "PromptTemplate", "QwenImageProcessor",
    "QwenTokenizer", "QwenVLProcessor", "TEMPLATES", "TextEncoderInputs", "bucket_length", "build_inputs",
    "extract_masked_hidden", "format_prompt", "mask_or_none", "pad_inputs", "prompt_embeds_from_hidden",
    "smart_resize", "trim_to_longest",
]
