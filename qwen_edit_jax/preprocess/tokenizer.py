"""The Qwen2 tokenizer through the `tokenizers` library, equal to transformers' `Qwen2Tokenizer` (v5).

transformers 5 builds the Qwen2 tokenizer as: byte-level BPE (no unk, no dropout, no fuse_unk), an
NFC normalizer, the Qwen2 split regex (behaviour "isolated") followed by a byte-level pre-tokenizer
without prefix space or regex, a byte-level decoder, and no special tokens added around the text. The
added tokens (`<|im_start|>`, `<|image_pad|>`, …) come from `tokenizer_config.json`'s
`added_tokens_decoder` and are matched anywhere in the text before BPE. `QwenTokenizer.from_folder`
builds exactly that from `vocab.json` + `merges.txt`, or loads `tokenizer.json` directly when present.
Output is numpy; padding and truncation follow transformers' `padding=True` / `truncation=True`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
from tokenizers import pre_tokenizers as pre
from tokenizers.models import BPE

PRETOKENIZE_REGEX = (  # transformers' qwen2 PRETOKENIZE_REGEX
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The Qwen2/2.5-VL added tokens in id order (151643… in the real tokenizer) and whether each is special.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True),
    ("<|quad_start|>", True), ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True),
    ("<|vision_pad|>", True), ("<|image_pad|>", True), ("<|video_pad|>", True),
    ("<tool_call>", False), ("</tool_call>", False), ("<|fim_prefix|>", False), ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False), ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)
SPECIAL_TOKENS: tuple[str, ...] = tuple(t for t, special in ADDED_TOKENS if special)
IMAGE_TOKEN = "<|image_pad|>"

_NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_QWEN2_DEFAULTS = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}


def build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    """The `tokenizers` pipeline of transformers' `Qwen2Tokenizer.__init__`, without added tokens."""
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence([
        pre.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _token_content(value) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, an AddedToken dict or None."""
    return value.get("content") if isinstance(value, dict) else value


def _added_token(entry: dict) -> AddedToken:
    """An `added_tokens_decoder` entry (content + flags) as a `tokenizers.AddedToken`."""
    return AddedToken(entry["content"], single_word=entry.get("single_word", False),
                      lstrip=entry.get("lstrip", False), rstrip=entry.get("rstrip", False),
                      normalized=entry.get("normalized", not entry.get("special", False)),
                      special=entry.get("special", False))


def _added_token_entries(folder: Path, config: dict) -> list[tuple[int, dict]]:
    """(id, entry) of the added tokens: `added_tokens_decoder`, else the legacy `added_tokens.json`."""
    if "added_tokens_decoder" in config:
        return sorted((int(i), e) for i, e in config["added_tokens_decoder"].items())
    legacy = folder / "added_tokens.json"
    if not legacy.is_file():
        return []
    named = {_token_content(config.get(k)) for k in _NAMED_SPECIAL}
    named |= {_token_content(t) for t in config.get("additional_special_tokens") or []}
    entries = json.loads(legacy.read_text(encoding="utf-8"))
    return sorted((i, {"content": t, "special": t in named, "normalized": t not in named}) for t, i in entries.items())


def _add_tokens_with_ids(tok: Tokenizer, entries: list[tuple[int, dict]], folder: Path) -> None:
    """Add the configured tokens in id order and check each lands on its configured id."""
    for idx, entry in entries:
        token = _added_token(entry)
        (tok.add_special_tokens if token.special else tok.add_tokens)([token])
        got = tok.token_to_id(token.content)
        if got != idx:
            raise ValueError(f"{folder}: added token {token.content!r} is configured with id {idx} but gets id {got}")


@dataclass(frozen=True)
class Encoding:
    """Token ids and attention mask, numpy int32 `[B, L]` (1 = token, 0 = padding)."""

    input_ids: np.ndarray
    attention_mask: np.ndarray


class QwenTokenizer:
    """Qwen2 tokenizer equal to transformers' `Qwen2Tokenizer` on encoding; numpy output."""

    def __init__(self, backend: Tokenizer, *, pad_token: str | None = "<|endoftext|>", padding_side: str = "right",
                 truncation_side: str = "right"):
        if padding_side not in ("right", "left") or truncation_side not in ("right", "left"):
            raise ValueError(f"padding_side/truncation_side must be 'right' or 'left', got {padding_side}, "
                             f"{truncation_side}")
        self.backend = backend
        self.pad_token = pad_token
        self.padding_side = padding_side
        self.truncation_side = truncation_side

    @classmethod
    def from_folder(cls, folder: str | Path) -> QwenTokenizer:
        """Load `tokenizer.json`, or build from `vocab.json` + `merges.txt`; added tokens from the config."""
        folder = Path(folder)
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        if (folder / "tokenizer.json").is_file():
            tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
            tok = build_backend(vocab, merges)
            # transformers' post-processor adds nothing around the text unless bos/eos are asked for.
            if config.get("add_bos_token") or config.get("add_eos_token"):
                raise ValueError(f"{config_path}: add_bos_token/add_eos_token are not supported for Qwen2")
        else:
            raise FileNotFoundError(f"{folder}: neither tokenizer.json nor vocab.json + merges.txt found")
        _add_tokens_with_ids(tok, _added_token_entries(folder, config), folder)
        # transformers (re)adds the named and extra special tokens as special added tokens; Qwen2Tokenizer
        # defaults eos/pad/unk to <|endoftext|> when the config does not name them.
        named = [_token_content(config.get(k, _QWEN2_DEFAULTS.get(k))) for k in _NAMED_SPECIAL]
        extra = [_token_content(t) for t in config.get("additional_special_tokens")
                 or config.get("extra_special_tokens") or []]
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        missing = list(dict.fromkeys(t for t in named + extra if t and t not in added))
        if missing:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        tok.encode_special_tokens = bool(config.get("split_special_tokens", False))
        tok.no_padding()
        tok.no_truncation()
        return cls(tok, pad_token=_token_content(config.get("pad_token", _QWEN2_DEFAULTS["pad_token"])),
                   padding_side=config.get("padding_side", "right"),
                   truncation_side=config.get("truncation_side", "right"))

    # --- vocabulary -------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        """Id of a token (an added token such as `<|image_pad|>` or a byte-level BPE token)."""
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return idx

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.token_to_id(self.pad_token)

    @property
    def image_token_id(self) -> int:
        return self.token_to_id(IMAGE_TOKEN)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    # --- encoding ---------------------------------------------------------------------------------
    def encode_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Unpadded token ids per text (transformers' `tokenizer(texts)["input_ids"]`)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=True)]

    def __call__(self, texts: str | Sequence[str], *, padding: bool | str = True, truncation: bool = False,
                 max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 padding_side: str | None = None) -> Encoding:
        """Tokenize and pad, as transformers' `tokenizer(texts, padding=..., truncation=..., max_length=...)`.

        padding: True / "longest" pads to the longest text, "max_length" to `max_length`, False / "do_not_pad"
        only when all texts have one length; `pad_to_multiple_of` rounds the padded length up.
        truncation (with `max_length`) cuts each text on `truncation_side`.
        """
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = self.encode_ids(texts)
        if truncation and max_length is not None:
            ids = [truncate(x, max_length, self.truncation_side) for x in ids]
        return pad_ids(ids, pad_id=self.pad_token_id, padding=padding, max_length=max_length,
                       pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side or self.padding_side)

    encode = __call__

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)


def truncate(ids: list[int], max_length: int, side: str = "right") -> list[int]:
    """Keep at most `max_length` ids, cutting on `side`."""
    if len(ids) <= max_length:
        return ids
    return ids[:max_length] if side == "right" else ids[len(ids) - max_length:]


def pad_ids(ids: Sequence[Sequence[int]], *, pad_id: int | None, padding: bool | str = True,
            max_length: int | None = None, pad_to_multiple_of: int | None = None,
            padding_side: str = "right") -> Encoding:
    """Stack token-id lists into `[B, L]` int32 arrays with pad ids and a 0/1 attention mask."""
    lengths = [len(x) for x in ids]
    if padding in (True, "longest"):
        length = max(lengths, default=0)
    elif padding == "max_length":
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        length = max(max_length, *lengths)  # transformers never truncates while padding
    elif padding in (False, "do_not_pad"):
        if len(set(lengths)) > 1:
            raise ValueError(f"texts have different lengths {sorted(set(lengths))}; pass padding=True")
        length = max(lengths, default=0)
    else:
        raise ValueError(f"unknown padding {padding!r}")
    if pad_to_multiple_of and padding not in (False, "do_not_pad"):
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    if pad_id is None and any(n < length for n in lengths):
        raise ValueError("padding needs a pad_token, and this tokenizer has none")
    input_ids = np.full((len(ids), length), pad_id if pad_id is not None else 0, dtype=np.int32)
    mask = np.zeros((len(ids), length), dtype=np.int32)
    for row, x in enumerate(ids):
        cols = slice(0, len(x)) if padding_side == "right" else slice(length - len(x), length)
        input_ids[row, cols] = x
        mask[row, cols] = 1
    return Encoding(input_ids, mask)
