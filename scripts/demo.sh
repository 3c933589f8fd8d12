#!/usr/bin/env bash
# The whole road on tiny random models, on a CPU in a few minutes: image pairs -> training cache ->
# LoRA (validation grids as it learns) -> edited PNGs. Each step is the command you would run on your
# own data, printed before it runs. Writes only demo_data/ and runs/demo/; finished steps are reused
# (delete those folders to start over).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
run() { echo "+ $*" >&2; "$@"; }

# 1. a tiny random Qwen-Image-Edit-2509-shaped repo (DiT, VAE, Qwen2.5-VL, tokenizer, processor, scheduler)
#    and 64 synthetic image pairs with four learnable edits ("make the square red", "mirror the image", ...);
#    also the inputs of train/configs/latent_demo.yaml (demo_data/latent/: a random DiT and a cache of latents)
run "$PY" -m qwen_edit_jax.demo --out demo_data
# 2. the training cache: VAE latents and prompt embeddings of every pair
run "$PY" train/cache_dataset.py --dataset demo_data/pairs --model demo_data/tiny-qwen-image-edit \
    --output demo_data/edit-cache --resolution 128 --control-resolution target --dtype float32
# 3. the LoRA, with before/after validation grids in runs/demo/validation/ and TensorBoard events
run "$PY" train/train_lora.py --config train/configs/demo.yaml --output-dir runs/demo
# 4. an edit with the trained LoRA, on a held-out input
run "$PY" sample/sample.py --model demo_data/tiny-qwen-image-edit --lora runs/demo/lora_diffusers.safetensors \
    --image demo_data/pairs_validation/00.png --prompt "make the square red" --resolution 128 --cfg 1 \
    --steps 20 --dtype float32 --out runs/demo/samples --overwrite
echo "done: validation grids in runs/demo/validation/, the edit in runs/demo/samples/, the LoRA in" \
     "runs/demo/lora_diffusers.safetensors; TensorBoard (pip install tensorboard): tensorboard --logdir runs/demo/tensorboard" >&2
