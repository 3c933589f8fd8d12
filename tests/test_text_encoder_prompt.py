"""`load_text_encoder(repo).encode_prompt` vs diffusers 0.42.1 `encode_prompt` with the torch text encoder.

A tiny random diffusers-style repo is built in the test: `text_encoder/` (a random tiny
`Qwen2_5_VLForConditionalGeneration`, `save_pretrained`), `tokenizer/` (the tiny Qwen2 tokenizer of
`testing/tokenizer.py`) and `processor/` (the same tokenizer + a `preprocessor_config.json` with small
pixel bounds so the images stay a few hundred patches, still several 112-px windows each).

The diffusers side runs the pipelines' own `encode_prompt` (unbound, on a stand-in `self`) with
transformers' Qwen2VLProcessor (PIL image processor) and the torch model called as it was trained:
`mm_token_type_ids` added to the pipeline's text-encoder call (the M-RoPE fix, diffusers #14194).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("diffusers")
from diffusers.pipelines.qwenimage import pipeline_qwenimage as hf_t2i  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as hf_edit  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as hf_plus  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

import jax.numpy as jnp  # noqa: E402

import text_encoder_reference as R  # noqa: E402
from tests.compare import assert_close, assert_differs  # noqa: E402
from qwen_edit_jax.encoding import bucket_key  # noqa: E402
from qwen_edit_jax.errors import CheckpointError  # noqa: E402
from qwen_edit_jax.loading.text_encoder import load_text_encoder  # noqa: E402
from qwen_edit_jax.imaging import condition_images  # noqa: E402
from qwen_edit_jax.preprocess import bucket_length  # noqa: E402
from qwen_edit_jax.testing.tokenizer import write_tiny_processor  # noqa: E402

TOL = 3e-5  # fp32 embeds vs diffusers: measured ≤ 2.2e-6 (2026-12-07, 2-core CPU), ≈ 10×
POSITIONS_DIFFER = 1e-2  # the 1D / 3D position guard: measured ≥ 1.06
# 224² max: a 3:2 image becomes 12×18 patches = 6×9 merged cells = 2×3 windows (partial ones)
IMAGE_CONFIG = {"min_pixels": 56 * 56, "max_pixels": 224 * 224, "patch_size": 14, "temporal_patch_size": 2,
                "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}
VISION = dict(depth=2, fullatt_block_indexes=[1])  # one window block, one full-attention block
PIPELINES = {"t2i": hf_t2i.QwenImagePipeline, "edit": hf_edit.QwenImageEditPipeline,
             "edit_plus": hf_plus.QwenImageEditPlusPipeline}
CPU = torch.device("cpu")


class _RefProcessor(transformers.Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor (that needs torchvision); images only."""

    def check_argument_for_proper_class(self, name, arg):
        return None if arg is None else super().check_argument_for_proper_class(name, arg)


class TrainedPositions:
    """The torch text encoder as the pipelines call it, plus `mm_token_type_ids` (3D M-RoPE, as trained)."""

    dtype = torch.float32

    def __init__(self, model, image_token_id: int, fix: bool = True):
        self.model, self.image_token_id, self.fix = model, image_token_id, fix

    def __call__(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, output_hidden_states=True):
        kw = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                  image_grid_thw=image_grid_thw, output_hidden_states=output_hidden_states)
        if self.fix:
            kw["mm_token_type_ids"] = (input_ids == self.image_token_id).long()
        with torch.no_grad():
            return self.model(**kw)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A tiny diffusers-style repo folder and the torch side of it."""
    root = tmp_path_factory.mktemp("qwen_image_edit_tiny")
    vocab = write_tiny_processor(root, IMAGE_CONFIG)
    ids = vocab.token_ids
    model = R.make_torch_model(seed=3, text=dict(vocab_size=vocab.vocab_size), vision=VISION, token_ids=ids)
    model.save_pretrained(root / "text_encoder")
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(root / "tokenizer")
    processor = _RefProcessor(image_processor=Qwen2VLImageProcessorPil(**{k: IMAGE_CONFIG[k] for k in (
        "min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")}), tokenizer=tokenizer,
        video_processor=None)
    return SimpleNamespace(root=root, model=model, tokenizer=tokenizer, processor=processor,
                           image_token_id=ids["image_token_id"])


@pytest.fixture(scope="module")
def enc(repo):
    return load_text_encoder(repo.root, dtype=jnp.float32)


def reference(variant: str, repo, fix: bool = True):
    """A stand-in `self` for the diffusers pipeline's `encode_prompt`, with the real templates."""
    cls = PIPELINES[variant]
    kw = {"scheduler": None, "vae": None, "text_encoder": None, "tokenizer": None, "transformer": None}
    real = cls(**kw) if variant == "t2i" else cls(processor=None, **kw)
    self = SimpleNamespace(processor=repo.processor, tokenizer=repo.tokenizer, tokenizer_max_length=1024,
                           text_encoder=TrainedPositions(repo.model, repo.image_token_id, fix),
                           prompt_template_encode=real.prompt_template_encode,
                           prompt_template_encode_start_idx=real.prompt_template_encode_start_idx,
                           _execution_device=CPU)
    self._extract_masked_hidden = lambda h, m: cls._extract_masked_hidden(self, h, m)
    self._get_qwen_prompt_embeds = lambda *a, **k: cls._get_qwen_prompt_embeds(self, *a, **k)
    return lambda **k: cls.encode_prompt(self, device=CPU, **k)


def image(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def assert_encoded_close(ours, ref, what: str):
    """fp32 relative error ≤ TOL on embeds; masks equal (diffusers' None = all ones)."""
    (embeds, mask), (ref_embeds, ref_mask) = ours, ref
    embeds, mask = np.asarray(embeds), np.asarray(mask)
    ref_embeds = ref_embeds.numpy()
    ref_mask = np.ones(ref_embeds.shape[:2], np.int64) if ref_mask is None else ref_mask.numpy()
    assert embeds.shape == ref_embeds.shape and embeds.shape[-1] == 64
    np.testing.assert_array_equal(mask, ref_mask)
    assert np.isfinite(embeds).all()
    assert_close(embeds, ref_embeds, TOL, what)
    assert not embeds[mask == 0].any()


PROMPTS = ["make it snow", "replace the sky with a sunset, keep the people; add 3 birds 🐦 and a 红色 kite"]
EDIT_IMAGES = [image(84, 56, 0), image(60, 90, 1)]
PLUS_ROWS = [(PROMPTS[0], [image(84, 56, 2), image(56, 56, 3)]), (PROMPTS[1], [image(56, 112, 4), image(70, 50, 5)])]


def test_edit_batch_matches_diffusers(enc, repo):
    """Edit, two prompts of different lengths, one image each of different sizes (several windows each)."""
    ref = reference("edit", repo)(prompt=PROMPTS, image=[condition_images([r], "edit")[0] for r in EDIT_IMAGES])
    assert ref[1] is not None and not ref[1].all()  # really padded
    ours = enc.encode_prompt(PROMPTS, EDIT_IMAGES, variant="edit")
    assert ours[0].dtype == jnp.float32
    assert_encoded_close(ours, ref, "edit batch")


def test_edit_plus_rows_match_diffusers(enc, repo):
    """Edit-Plus, a batch of two prompts with two images each; diffusers refuses batches, so each row
    is compared with diffusers on that prompt alone (padding after it: zeros, mask 0)."""
    embeds, mask = (np.asarray(x) for x in enc.encode_prompt([p for p, _ in PLUS_ROWS], [im for _, im in PLUS_ROWS],
                                                               variant="edit_plus"))
    lengths = []
    for i, (prompt, images) in enumerate(PLUS_ROWS):
        ref = reference("edit_plus", repo)(prompt=prompt, image=[*condition_images(images, "edit_plus")])
        n = ref[0].shape[1]
        lengths.append(n)
        assert_encoded_close((embeds[i:i + 1, :n], mask[i:i + 1, :n]), ref, f"edit_plus row {i}")
        assert not mask[i, n:].any() and not embeds[i, n:].any()
    assert embeds.shape[1] == max(lengths) and lengths[0] != lengths[1]


@pytest.mark.parametrize("max_sequence_length", [1024, 20])
def test_t2i_batch_matches_diffusers(enc, repo, max_sequence_length):
    ref = reference("t2i", repo)(prompt=PROMPTS, max_sequence_length=max_sequence_length)
    assert_encoded_close(enc.encode_prompt(PROMPTS, variant="t2i", max_sequence_length=max_sequence_length), ref,
                         f"t2i batch, max length {max_sequence_length}")


def test_one_dimensional_positions_differ(enc, repo):
    """Guard: the unpatched pipeline (transformers ≥ 5.15: 1D positions for image tokens) is measurably
    different from ours, which follows the trained 3D positions."""
    images = [condition_images([r], "edit")[0] for r in EDIT_IMAGES]
    ref1d = reference("edit", repo, fix=False)(prompt=PROMPTS, image=images)[0].numpy()
    ref3d = reference("edit", repo)(prompt=PROMPTS, image=images)[0].numpy()
    ours = np.asarray(enc.encode_prompt(PROMPTS, EDIT_IMAGES, variant="edit")[0])
    assert_differs(ref1d, ref3d, POSITIONS_DIFFER, "diffusers 1D vs 3D positions")
    assert_differs(ours, ref1d, POSITIONS_DIFFER, "ours vs diffusers 1D positions")


def test_one_program_per_bucket(enc):
    """Other prompt lengths and image sizes in the same bucket reuse the compiled program."""
    rows = [("shorter", [image(84, 56, 7), image(56, 60, 8)]),
            ("a somewhat longer prompt, 3 words more", [image(90, 60, 9), image(56, 56, 10)])]
    new = enc.prepare([p for p, _ in rows], [im for _, im in rows], "edit_plus")
    old = enc.prepare([p for p, _ in PLUS_ROWS], [im for _, im in PLUS_ROWS], "edit_plus")
    assert new.input_ids.shape != old.input_ids.shape and not np.array_equal(new.image_grid_thw, old.image_grid_thw)
    assert bucket_key(enc.config, new) == bucket_key(enc.config, old)
    enc.encode_prompt([p for p, _ in PLUS_ROWS], [im for _, im in PLUS_ROWS], variant="edit_plus")
    before = list(enc.compiled_keys)
    embeds, mask = enc.encode_prompt([p for p, _ in rows], [im for _, im in rows], variant="edit_plus")
    assert enc.compiled_keys == before and np.isfinite(np.asarray(embeds)).all()
    assert bucket_key(enc.config, new) in before


def test_padded_output_is_static(enc):
    out = enc.encode_padded(PROMPTS, variant="t2i")
    length = bucket_length(enc.prepare(PROMPTS, None, "t2i").input_ids.shape[1])
    assert out.embeds.shape[:2] == (2, length - 34) and out.batch == 2 and length % 64 == 0
    np.testing.assert_array_equal(np.asarray(out.mask).sum(1), out.lengths)


WORKER = """
import sys
import numpy as np, jax, jax.numpy as jnp
from PIL import Image
from qwen_edit_jax.loading.text_encoder import load_text_encoder
from qwen_edit_jax.parallel import make_mesh
repo, images, prompts, out = sys.argv[1], np.load(sys.argv[2]), sys.argv[3].split("|"), sys.argv[4]
assert jax.device_count() == 4
enc = load_text_encoder(repo, dtype=jnp.float32, mesh=make_mesh(1, 2, 2))
embeds, mask = enc.encode_prompt(prompts, [Image.fromarray(images[k]) for k in sorted(images)], variant="edit")
np.savez(out, embeds=np.asarray(embeds), mask=np.asarray(mask))
"""


def test_edit_batch_on_a_mesh_matches_diffusers(repo, tmp_path):
    """FSDP × tensor parallel weights and batch-split inputs over 4 simulated CPU devices."""
    np.savez(tmp_path / "images.npz", **{f"i{k}": np.asarray(im) for k, im in enumerate(EDIT_IMAGES)})
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "-c", WORKER, str(repo.root), str(tmp_path / "images.npz"), "|".join(PROMPTS),
                        str(tmp_path / "out.npz")], env=env, capture_output=True, text=True, timeout=600,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    ref = reference("edit", repo)(prompt=PROMPTS, image=[condition_images([r], "edit")[0] for r in EDIT_IMAGES])
    assert_encoded_close((out["embeds"], out["mask"]), ref, "edit batch on a 2×2 mesh")


# ---- loading errors --------------------------------------------------------------------------------
def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def _partial_repo(tmp_path, repo, *folders):
    for f in folders:
        os.symlink(repo.root / f, tmp_path / f)
    return tmp_path


def test_missing_folders_name_the_path(repo, tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(tmp_path / "nope")
    assert str(tmp_path / "nope") in _one_line(e)
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(_partial_repo(tmp_path, repo, "tokenizer", "processor"))
    assert str(tmp_path / "text_encoder") in _one_line(e)


def test_missing_tokenizer_and_processor(repo, tmp_path):
    with pytest.raises(CheckpointError, match="neither tokenizer/ nor processor/") as e:
        load_text_encoder(_partial_repo(tmp_path, repo, "text_encoder"))
    _one_line(e)


def test_missing_preprocessor_config(repo, tmp_path):
    os.symlink(repo.root / "text_encoder", tmp_path / "text_encoder")
    shutil.copytree(repo.root / "tokenizer", tmp_path / "processor")
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(tmp_path)
    assert str(tmp_path / "processor" / "preprocessor_config.json") in _one_line(e)


def test_t2i_repo_without_processor(repo, tmp_path):
    enc = load_text_encoder(_partial_repo(tmp_path, repo, "text_encoder", "tokenizer"), dtype=jnp.float32)
    assert enc.processor is None and enc.processor_for("t2i") is enc.t2i_processor
    with pytest.raises(ValueError, match="processor/") as e:
        enc.encode_prompt("a cat", image(56, 56, 0), variant="edit")
    _one_line(e)


def test_tokenizer_that_does_not_fit_the_model(repo, tmp_path):
    os.symlink(repo.root / "processor", tmp_path / "processor")
    shutil.copytree(repo.root / "text_encoder", tmp_path / "text_encoder")
    cfg_path = tmp_path / "text_encoder" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_token_id"] = cfg["video_token_id"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="image_token_id") as e:
        load_text_encoder(tmp_path)
    _one_line(e)


def test_unknown_attention_kernel(repo):
    with pytest.raises(ValueError, match="unknown attention implementation 'flash2'") as e:
        load_text_encoder(repo.root, attention="flash2")
    _one_line(e)


def test_input_errors(enc):
    with pytest.raises(ValueError, match="variant"):
        enc.encode_prompt("a", variant="edit2")
    with pytest.raises(ValueError, match="1024"):
        enc.encode_prompt("a", image(56, 56, 0), variant="edit", max_sequence_length=2048)
    with pytest.raises(ValueError, match="exactly one image"):
        enc.encode_prompt(["a"], [[image(56, 56, 0), image(56, 56, 1)]], variant="edit")
