"""The models: the DiT (`dit`), the VAE (`vae`), the Qwen2.5-VL prompt encoder (`text_encoder`), shared attention `kernels`. No file I/O."""
