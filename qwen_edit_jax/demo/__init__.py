"""`python -m qwen_edit_jax.demo` (layer 7): writes the demos' inputs from the fixtures of `testing`.

See `__main__` for what it writes; the library and the trainer never make these themselves.
"""
