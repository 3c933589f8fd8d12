"""Templates, image sizing, processor inputs and prompt-embedding post-processing vs diffusers 0.42.1.

The diffusers side runs the pipelines' own `encode_prompt` / `_get_qwen_prompt_embeds` (unbound, on a
stand-in `self`) with transformers' Qwen2VLProcessor (test tokenizer + PIL image processor) and a fake
text encoder whose last hidden state is a table lookup of the token ids, so both sides' inputs and
post-processing are compared exactly.
"""

from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")
from diffusers.image_processor import VaeImageProcessor  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage as hf_t2i  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as hf_edit  # noqa: E402
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as hf_plus  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from qwen_edit_jax.imaging import (  # noqa: E402
    CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE, calculate_dimensions, condition_images, output_dims, plan_sizes, vae_pixels,
)
from qwen_edit_jax.preprocess import (  # noqa: E402
    TEMPLATES, QwenImageProcessor, QwenTokenizer, QwenVLProcessor, bucket_length, build_inputs, extract_masked_hidden,
    mask_or_none, pad_inputs, prompt_embeds_from_hidden,
)
from qwen_edit_jax.preprocess.image_processor import ImageProcessorConfig  # noqa: E402
from qwen_edit_jax.testing.tokenizer import write_tiny_tokenizer  # noqa: E402

PIPELINES = {"t2i": hf_t2i.QwenImagePipeline, "edit": hf_edit.QwenImageEditPipeline,
             "edit_plus": hf_plus.QwenImageEditPlusPipeline}
IMAGE_CONFIG = {"min_pixels": 3136, "max_pixels": 12845056}
HIDDEN = 8


def condition_image(im, variant):
    """One image as the pipeline hands it to the VL processor."""
    return condition_images([im], variant)[0]


def vae_image(im, variant):
    """One image as the pipeline hands it to the VAE."""
    return vae_pixels(im, plan_sizes([im], variant).vae[0])


class _RefProcessor(transformers.Qwen2VLProcessor):
    """Qwen2VLProcessor without a video processor (that needs torchvision); images only."""

    def check_argument_for_proper_class(self, name, arg):
        return None if arg is None else super().check_argument_for_proper_class(name, arg)


class FakeEncoder:
    """Stands in for Qwen2_5_VLForConditionalGeneration: hidden_states[-1] = table[input_ids]; records inputs."""

    dtype = torch.float32

    def __init__(self, table):
        self.table, self.calls = torch.from_numpy(table), []

    def __call__(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, output_hidden_states=True):
        self.calls.append({"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values,
                           "image_grid_thw": image_grid_thw})
        return SimpleNamespace(hidden_states=(None, self.table[input_ids]))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = write_tiny_tokenizer(tmp_path_factory.mktemp("processor"))
    tokenizer = transformers.Qwen2Tokenizer.from_pretrained(folder)
    ref_proc = _RefProcessor(image_processor=Qwen2VLImageProcessorPil(**IMAGE_CONFIG), tokenizer=tokenizer,
                             video_processor=None)
    ours = QwenVLProcessor(QwenTokenizer.from_folder(folder),
                           QwenImageProcessor(ImageProcessorConfig.from_dict(IMAGE_CONFIG)))
    table = np.random.default_rng(0).standard_normal((len(tokenizer), HIDDEN)).astype(np.float32)
    return SimpleNamespace(tokenizer=tokenizer, ref_proc=ref_proc, ours=ours, table=table)


def reference_pipe(variant, env):
    """A stand-in `self` for the diffusers pipeline methods, with the real templates."""
    cls = PIPELINES[variant]
    kw = {"scheduler": None, "vae": None, "text_encoder": None, "tokenizer": None, "transformer": None}
    real = cls(**kw) if variant == "t2i" else cls(processor=None, **kw)
    self = SimpleNamespace(processor=env.ref_proc, tokenizer=env.tokenizer, text_encoder=FakeEncoder(env.table),
                           prompt_template_encode=real.prompt_template_encode, tokenizer_max_length=1024,
                           prompt_template_encode_start_idx=real.prompt_template_encode_start_idx,
                           _execution_device=torch.device("cpu"))
    self._extract_masked_hidden = lambda h, m: cls._extract_masked_hidden(self, h, m)
    self._get_qwen_prompt_embeds = lambda *a, **k: cls._get_qwen_prompt_embeds(self, *a, **k)
    self.encode_prompt = lambda *a, **k: cls.encode_prompt(self, *a, **k)
    return self


def ours_encode(env, prompts, images, variant, max_sequence_length=1024, **kw):
    inputs = build_inputs(env.ours, prompts, images, variant, **kw)
    embeds, mask = prompt_embeds_from_hidden(env.table[inputs.input_ids], inputs.attention_mask, inputs.drop_idx,
                                             variant, max_sequence_length)
    return inputs, embeds, mask


def assert_inputs_equal(inputs, call):
    np.testing.assert_array_equal(inputs.input_ids, call["input_ids"].numpy())
    np.testing.assert_array_equal(inputs.attention_mask, call["attention_mask"].numpy())
    if call["pixel_values"] is None:
        assert inputs.pixel_values is None
    else:
        np.testing.assert_array_equal(inputs.pixel_values, call["pixel_values"].numpy())
        np.testing.assert_array_equal(inputs.image_grid_thw, call["image_grid_thw"].numpy())


def assert_embeds_equal(ours, ref):
    (embeds, mask), (ref_embeds, ref_mask) = ours, ref
    np.testing.assert_array_equal(embeds, ref_embeds.numpy())
    if ref_mask is None:
        assert mask_or_none(mask) is None
    else:
        np.testing.assert_array_equal(mask, ref_mask.numpy())


def image(w, h, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8), mode)


def test_templates_equal_diffusers():
    for variant, cls in PIPELINES.items():
        kw = {"scheduler": None, "vae": None, "text_encoder": None, "tokenizer": None, "transformer": None}
        real = cls(**kw) if variant == "t2i" else cls(processor=None, **kw)
        assert TEMPLATES[variant].template == real.prompt_template_encode
        assert TEMPLATES[variant].drop_idx == real.prompt_template_encode_start_idx
    assert (hf_plus.CONDITION_IMAGE_SIZE, hf_plus.VAE_IMAGE_SIZE) == (CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE)


def test_sizes_equal_diffusers():
    for ratio in np.random.default_rng(1).uniform(0.1, 10.0, 500).tolist() + [1.0, 4 / 3, 16 / 9, 9 / 16]:
        for area in (CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE):
            assert calculate_dimensions(area, ratio) == hf_plus.calculate_dimensions(area, ratio)
            assert calculate_dimensions(area, ratio) == hf_edit.calculate_dimensions(area, ratio)[:2]
    img = image(333, 187, 0)
    w, h = hf_edit.calculate_dimensions(1024 * 1024, img.width / img.height)[:2]
    assert output_dims(None, None, plan_sizes([img], "edit").output, 16) == (h // 16 * 16, w // 16 * 16)


@pytest.mark.parametrize("size,mode", [((300, 200), "RGB"), ((97, 161), "RGBA")])
def test_edit_single_image(env, size, mode):
    """QwenImageEditPipeline.__call__ steps: 1 Mpx Lanczos resize, encode_prompt on the resized image."""
    raw = image(*size, seed=2, mode=mode)
    w, h, _ = hf_edit.calculate_dimensions(1024 * 1024, raw.size[0] / raw.size[1])
    vae_proc = VaeImageProcessor(vae_scale_factor=16)
    prompt_image = vae_proc.resize(raw, h, w)
    pipe = reference_pipe("edit", env)
    ref = pipe.encode_prompt(prompt="Make it 冬天 ❄️", image=prompt_image, device=torch.device("cpu"))
    inputs, *ours = ours_encode(env, "Make it 冬天 ❄️", raw, "edit")
    assert_inputs_equal(inputs, pipe.text_encoder.calls[0])
    assert_embeds_equal(ours, ref)
    assert np.array_equal(np.asarray(condition_image(raw, "edit")), np.asarray(prompt_image))
    ref_mm = env.ref_proc(text=[TEMPLATES["edit"].template.format("Make it 冬天 ❄️")], images=prompt_image,
                          padding=True, return_tensors="np")["mm_token_type_ids"]
    np.testing.assert_array_equal(inputs.mm_token_type_ids, ref_mm)
    if mode == "RGB":  # diffusers feeds RGB only to the VAE
        want = vae_proc.preprocess(prompt_image, h, w)[0].numpy()
        np.testing.assert_array_equal(vae_image(raw, "edit"), want)


def test_edit_batch_of_prompts_with_padding(env):
    """Two prompts of different lengths, one image each: padded batch, mask not all ones."""
    raws = [image(200, 300, 3), image(256, 256, 4)]
    resized = [condition_image(r, "edit") for r in raws]
    prompts = ["short", "a much longer instruction: replace the sky with a sunset, 保留人物, add 3 birds 🐦🐦🐦"]
    pipe = reference_pipe("edit", env)
    ref = pipe.encode_prompt(prompt=prompts, image=resized, device=torch.device("cpu"))
    inputs, *ours = ours_encode(env, prompts, raws, "edit")
    assert_inputs_equal(inputs, pipe.text_encoder.calls[0])
    assert ref[1] is not None and not ref[1].all()
    assert_embeds_equal(ours, ref)


def test_edit_plus_pictures(env):
    """QwenImageEditPlusPipeline.__call__ steps: 384² condition images, "Picture i:" prefixes; VAE at 1 Mpx."""
    raws = [image(640, 360, 5), image(123, 456, 6), image(50, 50, 7)]
    vae_proc = VaeImageProcessor(vae_scale_factor=16)
    conditions = []
    for raw in raws:
        cw, ch = hf_plus.calculate_dimensions(hf_plus.CONDITION_IMAGE_SIZE, raw.size[0] / raw.size[1])
        conditions.append(vae_proc.resize(raw, ch, cw))
        vw, vh = hf_plus.calculate_dimensions(hf_plus.VAE_IMAGE_SIZE, raw.size[0] / raw.size[1])
        np.testing.assert_array_equal(vae_image(raw, "edit_plus"), vae_proc.preprocess(raw, vh, vw)[0].numpy())
    prompt = "Put the hat from picture 2 on the man in picture 1, background of picture 3"
    pipe = reference_pipe("edit_plus", env)
    ref = pipe.encode_prompt(prompt=prompt, image=conditions, device=torch.device("cpu"))
    inputs, *ours = ours_encode(env, prompt, raws, "edit_plus")
    assert inputs.images_per_row == (3,)
    assert_inputs_equal(inputs, pipe.text_encoder.calls[0])
    assert_embeds_equal(ours, ref)
    # no image: the template without pictures
    ref = pipe.encode_prompt(prompt=prompt, image=None, device=torch.device("cpu"))
    assert_embeds_equal(ours_encode(env, prompt, None, "edit_plus")[1:], ref)


def test_edit_plus_batch_rows_equal_single_runs(env):
    """diffusers' Edit-Plus refuses batch > 1; each of our rows equals diffusers on that prompt alone."""
    rows = [("first prompt", [image(90, 60, 8)]), ("second, longer prompt with two pictures 图", [image(40, 80, 9),
                                                                                                 image(64, 64, 10)])]
    _, embeds, mask = ours_encode(env, [p for p, _ in rows], [imgs for _, imgs in rows], "edit_plus")
    for i, (prompt, imgs) in enumerate(rows):
        pipe = reference_pipe("edit_plus", env)
        ref_embeds, _ = pipe.encode_prompt(prompt=prompt, image=[condition_image(im, "edit_plus") for im in imgs],
                                           device=torch.device("cpu"))
        n = ref_embeds.shape[1]
        np.testing.assert_array_equal(embeds[i, :n], ref_embeds[0].numpy())
        assert mask[i, :n].all() and not mask[i, n:].any() and not embeds[i, n:].any()


@pytest.mark.parametrize("max_sequence_length", [1024, 20])
def test_t2i_truncation_and_max_sequence_length(env, max_sequence_length):
    prompts = ["一只戴帽子的猫", "long " * 700 + "end", "a photo of 3 dogs 🐕"]  # the second passes 1024 + 34 tokens
    pipe = reference_pipe("t2i", env)
    ref = pipe.encode_prompt(prompt=prompts, device=torch.device("cpu"), max_sequence_length=max_sequence_length)
    inputs, *ours = ours_encode(env, prompts, None, "t2i", max_sequence_length)
    assert inputs.input_ids.shape[1] == 1024 + 34
    assert_inputs_equal(inputs, pipe.text_encoder.calls[0])
    assert_embeds_equal(ours, ref)


def test_extract_masked_hidden_any_mask():
    """Masks of any shape (left padding, holes) as diffusers' `_get_qwen_prompt_embeds` handles them."""
    rng = np.random.default_rng(11)
    hidden = rng.standard_normal((4, 30, HIDDEN)).astype(np.float32)
    mask = (rng.random((4, 30)) < 0.7).astype(np.int64)
    mask[0] = 0
    mask[0, -12:] = 1  # left padding
    mask[3, 5:] = 0  # fewer valid tokens than drop_idx
    fake = SimpleNamespace(
        processor=lambda **kw: transformers.BatchFeature({"input_ids": torch.zeros(4, 30, dtype=torch.long),
                                                          "attention_mask": torch.from_numpy(mask)}),
        text_encoder=SimpleNamespace(dtype=torch.float32), prompt_template_encode="{}",
        prompt_template_encode_start_idx=7, _execution_device=torch.device("cpu"))
    fake.text_encoder = lambda **kw: SimpleNamespace(hidden_states=(torch.from_numpy(hidden),))
    fake.text_encoder.dtype = torch.float32
    cls = hf_edit.QwenImageEditPipeline
    fake._extract_masked_hidden = lambda h, m: cls._extract_masked_hidden(fake, h, m)
    ref_embeds, ref_mask = cls._get_qwen_prompt_embeds(fake, ["a"] * 4, None, torch.device("cpu"), torch.float32)
    embeds, out_mask = prompt_embeds_from_hidden(hidden, mask, 7, "edit")
    np.testing.assert_array_equal(embeds, ref_embeds.numpy())
    np.testing.assert_array_equal(out_mask, ref_mask.numpy())
    jitted = __import__("jax").jit(extract_masked_hidden, static_argnums=2)(hidden, mask, 7)
    assert jitted[0].shape == (4, 23, HIDDEN)
    np.testing.assert_array_equal(np.asarray(jitted[0])[:, :embeds.shape[1]], embeds)


def test_buckets_and_padding(env):
    assert [bucket_length(n) for n in (1, 64, 65, 129, 200, 257, 385, 513, 1025, 1450, 1537)] == [
        64, 64, 128, 192, 256, 384, 512, 768, 1536, 1536, 2048]
    inputs = build_inputs(env.ours, ["a", "a bit longer prompt"], [[image(64, 48, 12)], [image(30, 90, 13)]],
                          "edit_plus")
    padded = pad_inputs(inputs, env.ours.tokenizer.pad_token_id, batch=4)
    assert padded.input_ids.shape == (4, bucket_length(inputs.input_ids.shape[1]))
    assert padded.pixel_values.shape == (bucket_length(len(inputs.pixel_values)), 1176)
    assert padded.images_per_row == (1, 1, 0, 0) and not padded.pixel_values[len(inputs.pixel_values):].any()
    want = prompt_embeds_from_hidden(env.table[inputs.input_ids], inputs.attention_mask, 64, "edit_plus")
    got = prompt_embeds_from_hidden(env.table[padded.input_ids], padded.attention_mask, 64, "edit_plus")
    np.testing.assert_array_equal(got[0][:2], want[0])
    np.testing.assert_array_equal(got[1][:2], want[1])
    with pytest.raises(ValueError, match="1024"):
        prompt_embeds_from_hidden(env.table[inputs.input_ids], inputs.attention_mask, 64, "edit", 2048)


def test_input_errors(env):
    with pytest.raises(ValueError, match="exactly one image"):
        build_inputs(env.ours, ["a"], [[image(32, 32, 0), image(32, 32, 1)]], "edit")
    with pytest.raises(ValueError, match="2 prompts"):
        build_inputs(env.ours, ["a", "b"], [image(32, 32, 0)], "edit")
    with pytest.raises(ValueError, match="no images"):
        build_inputs(env.ours, ["a"], [image(32, 32, 0)], "t2i")
    with pytest.raises(ValueError, match="variant"):
        build_inputs(env.ours, ["a"], None, "edit2")
    with pytest.raises(ValueError, match="image_pad"):
        build_inputs(env.ours, ["<|image_pad|>"], [image(32, 32, 0)], "edit")
