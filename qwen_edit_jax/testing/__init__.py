"""Fixtures for the tests, the demo and the notebook (layer 6): tiny random models and the data they read.

The library itself never invents data; everything made up lives here, in small modules:

- `tokenizer`: a tiny Qwen2 BPE tokenizer folder and the processor folder beside it.
- `random_weights`: random tensors by name, a random DiT as a diffusers folder (numpy).
- `vae`: the tiny VAE architecture, random or *readable* (encode → decode exact on flat 8×8 blocks).
- `repo`: tiny random Qwen-Image-Edit repos: the parts caching reads, or the complete demo repo.
- `pairs`: synthetic square-scene edit pairs and held-out validation inputs.
- `latent`: the latent demo's random checkpoint and synthetic cache of latents.
- `batches`: tiny random DiT inputs and training batches.
- `manifest`: written-once outputs, reused when the settings match.

`python -m qwen_edit_jax.demo` writes the demos' inputs with them.
"""
