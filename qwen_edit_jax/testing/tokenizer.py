"""A tiny Qwen2-style tokenizer folder (and the processor folder beside it), built offline with `tokenizers`.

The real Qwen2.5-VL tokenizer cannot be downloaded in tests, so this trains a small byte-level BPE
with the same normalizer and pre-tokenizer and writes it in the released layout: `vocab.json` +
`merges.txt` + `tokenizer_config.json` (with `added_tokens_decoder`, as the Qwen repos hold it) and,
optionally, `tokenizer.json`. The Qwen special tokens get ids right after the BPE vocabulary, in the
same order as the real tokenizer (151643…151664 there). `write_tiny_processor` adds the `processor/`
folder a repo holds (the same tokenizer plus a `preprocessor_config.json`) and returns what a text
encoder's config needs from the vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, trainers
from tokenizers import pre_tokenizers as pre

from ..preprocess import QwenTokenizer
from ..preprocess.tokenizer import ADDED_TOKENS, SPECIAL_TOKENS, build_backend

# small pixel bounds keep the tiny repo's images to a few vision windows
TINY_IMAGE_PROCESSOR: dict[str, Any] = {
    "min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_processor_type": "Qwen2VLImageProcessor"}
# the text encoder config's keys for the vision tokens
VISION_TOKENS = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
                 "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}

# Varied text so that the BPE learns merges for English, Chinese, digits, punctuation and spaces.
TINY_CORPUS = (
    "Describe the key features of the input image (color, shape, size, texture, objects, background), "
    "then explain how the user's text instruction should alter or modify the image.",
    "Generate a new image that meets the user's requirements while maintaining consistency.",
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships.",
    "Picture 1: a red cat sits on the mat. Picture 2: a blue dog runs in the park!",
    "把背景换成海滩，保留人物的姿势。让天空变成橙色的晚霞。",
    "桌子上有三个苹果和两个香蕉，光线柔和。",
    "Change the text on the sign to 'OPEN 24/7' — keep the font.",
    "def f(x):\n    return x ** 2 + 3.14159  # numbers 0123456789\n\n",
    "Emoji 😀🎉🚀 and accents: café, naïve, Zürich, São Paulo.",
    "  leading spaces,\ttabs,\r\nwindows newlines and trailing spaces   ",
    "I'm sure you'll see it's what we'd done; they've left, we're here.",
    "Remove the person on the left; make the car yellow; add snow to the roof.",
)


def train_tiny_bpe(vocab_size: int = 600) -> Tokenizer:
    """Train a byte-level BPE on `TINY_CORPUS` with the Qwen2 normalizer and pre-tokenizer."""
    tok = build_backend({}, [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre.ByteLevel.alphabet(), show_progress=False, special_tokens=[]
    )
    tok.train_from_iterator(list(TINY_CORPUS) * 4, trainer)
    return tok


def tokenizer_config(first_added_id: int) -> dict:
    """`tokenizer_config.json` as in the Qwen2.5-VL / Qwen-Image repos, with ids from `first_added_id`."""
    decoder = {
        str(first_added_id + i): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        for i, (content, special) in enumerate(ADDED_TOKENS)
    }
    return {
        "add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "bos_token": None, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
        "errors": "replace", "model_max_length": 131072, "pad_token": "<|endoftext|>",
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    }


def write_tiny_tokenizer(folder: str | Path, *, with_tokenizer_json: bool = False, vocab_size: int = 600) -> Path:
    """Write a tiny Qwen2 tokenizer folder; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = train_tiny_bpe(vocab_size)
    tok.model.save(str(folder))  # vocab.json + merges.txt, model vocabulary only (as released)
    n = tok.get_vocab_size(with_added_tokens=False)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(n), indent=2, ensure_ascii=False))
    if with_tokenizer_json:
        tok.add_special_tokens([AddedToken(c, special=True, normalized=False) for c, s in ADDED_TOKENS if s])
        tok.add_tokens([AddedToken(c, special=False, normalized=False) for c, s in ADDED_TOKENS if not s])
        tok.save(str(folder / "tokenizer.json"))
    return folder


@dataclasses.dataclass(frozen=True)
class TinyVocab:
    """What a text encoder's config takes from the tiny tokenizer."""

    token_ids: dict[str, int]  # `VISION_TOKENS`' keys → their ids
    vocab_size: int  # the tokenizer's length rounded up to a multiple of 64 (embedding tables are padded so)


def write_tiny_processor(root: str | os.PathLike, image_config: dict[str, Any] = TINY_IMAGE_PROCESSOR) -> TinyVocab:
    """`root/tokenizer` (the tiny tokenizer) and `root/processor` (it plus `image_config` as
    `preprocessor_config.json`); an existing `processor/` is replaced."""
    root = Path(root)
    write_tiny_tokenizer(root / "tokenizer")
    if (root / "processor").exists():
        shutil.rmtree(root / "processor")
    shutil.copytree(root / "tokenizer", root / "processor")
    (root / "processor" / "preprocessor_config.json").write_text(json.dumps(image_config, indent=2))
    tok = QwenTokenizer.from_folder(root / "tokenizer")
    return TinyVocab({k: tok.token_to_id(t) for k, t in VISION_TOKENS.items()}, -(-len(tok) // 64) * 64)


__all__ = ["TINY_CORPUS", "TINY_IMAGE_PROCESSOR", "TinyVocab", "VISION_TOKENS", "tokenizer_config", "train_tiny_bpe",
           "write_tiny_processor", "write_tiny_tokenizer"]
