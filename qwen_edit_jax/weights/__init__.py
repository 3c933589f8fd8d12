"""Weight I/O: the key map, safetensors reading/writing, merged-param checkpoints."""
