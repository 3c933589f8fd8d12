"""QwenTokenizer vs transformers' Qwen2Tokenizer on a tiny Qwen2-style tokenizer built in the test."""

import json
import random

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from qwen_edit_jax.preprocess import QwenTokenizer, format_prompt  # noqa: E402
from qwen_edit_jax.testing.tokenizer import write_tiny_tokenizer  # noqa: E402
from qwen_edit_jax.preprocess.tokenizer import ADDED_TOKENS, PRETOKENIZE_REGEX  # noqa: E402

FRAGMENTS = [
    "Make the sky purple", "把背景换成海滩", "保留人物的姿势，", "😀", "🎉🚀", "👩‍👩‍👧", "\n", "\n\n", "\r\n", "\t", "   ",
    " ", "12345", "3.14159", "2025-06-01", "I'm", "they'll", "WE'RE", "don't", "café", "naïve", "Ünïcödé",
    "e\u0301", "Å", "ﬁ", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|image_pad|>",
    "<|vision_end|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|im_start", "|>", "<", ">",
    "Picture 1: ", "a", "A", "x" * 40, "!!!", "...", "'s", "—", "«quote»", "日本語のテキスト", "한국어", "ελληνικά",
    "русский", "عربى", "#", "@user", "https://example.com/a?b=c", "    return x", "$", "\u00a0", "\u200b",
]


def varied_strings(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = ["", " ", "\n", "hello world", "  leading and trailing  ", "\n\n\nnewlines\n\n"]
    out += [format_prompt("Change the cat to a dog.", "edit"), format_prompt("一只猫", "t2i"),
            format_prompt("Put the hat from picture 2 on the man in picture 1", "edit_plus", 2),
            format_prompt("x", "edit").replace("<|image_pad|>", "<|image_pad|>" * 7)]
    while len(out) < n:
        k = rng.randint(1, 8)
        out.append("".join(rng.choice(FRAGMENTS) + rng.choice(["", "", " ", "  "]) for _ in range(k)))
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["vocab+merges", "tokenizer.json"])
def pair(request, tmp_path_factory):
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("tok"), with_tokenizer_json=request.param)
    return QwenTokenizer.from_folder(folder), transformers.Qwen2Tokenizer.from_pretrained(folder), folder


def test_ids_equal_transformers(pair):
    from transformers.models.qwen2 import tokenization_qwen2

    assert PRETOKENIZE_REGEX == tokenization_qwen2.PRETOKENIZE_REGEX
    ours, ref, _ = pair
    texts = varied_strings()
    assert ours.encode_ids(texts) == [ref(t)["input_ids"] for t in texts]
    assert len(ours) == len(ref)
    assert ours.pad_token_id == ref.pad_token_id
    for token, _ in ADDED_TOKENS:
        assert ours.token_to_id(token) == ref.convert_tokens_to_ids(token)


def test_auto_tokenizer_is_the_same_class(pair):
    _, ref, folder = pair
    auto = transformers.AutoTokenizer.from_pretrained(folder)
    texts = varied_strings(40, seed=1)
    assert [auto(t)["input_ids"] for t in texts] == [ref(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("side", ["right", "left"])
def test_padding_and_truncation(pair, side):
    ours, ref, _ = pair
    texts = varied_strings(24, seed=2)
    ref.padding_side = side
    try:
        for kw in ({"padding": True}, {"padding": True, "truncation": True, "max_length": 9},
                   {"padding": "max_length", "max_length": 200}, {"padding": True, "pad_to_multiple_of": 16}):
            want = ref(texts, return_tensors="np", **kw)
            got = ours(texts, padding_side=side, **kw)
            np.testing.assert_array_equal(got.input_ids, want["input_ids"])
            np.testing.assert_array_equal(got.attention_mask, want["attention_mask"])
    finally:
        ref.padding_side = "right"


def test_config_padding_side_and_legacy_added_tokens(tmp_path):
    folder = write_tiny_tokenizer(tmp_path)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    decoder = cfg.pop("added_tokens_decoder")
    cfg["padding_side"] = "left"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "added_tokens.json").write_text(json.dumps({e["content"]: int(i) for i, e in decoder.items()}))
    ours, ref = QwenTokenizer.from_folder(folder), transformers.Qwen2Tokenizer.from_pretrained(folder)
    texts = varied_strings(30, seed=3)
    want = ref(texts, padding=True, return_tensors="np")
    got = ours(texts)
    assert ours.padding_side == ref.padding_side == "left"
    np.testing.assert_array_equal(got.input_ids, want["input_ids"])
    np.testing.assert_array_equal(got.attention_mask, want["attention_mask"])


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        QwenTokenizer.from_folder(tmp_path)
    folder = write_tiny_tokenizer(tmp_path / "t")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    first = min(cfg["added_tokens_decoder"], key=int)
    cfg["added_tokens_decoder"][str(int(first) + 1000)] = cfg["added_tokens_decoder"].pop(first)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="configured with id"):
        QwenTokenizer.from_folder(folder)
    tok = QwenTokenizer.from_folder(write_tiny_tokenizer(tmp_path / "u"))
    with pytest.raises(KeyError):
        tok.token_to_id("<|no_such_token|>")
    with pytest.raises(ValueError, match="padding=True"):
        tok(["a", "a b c"], padding=False)
