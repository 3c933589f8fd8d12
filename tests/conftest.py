"""Test-session setup: CPU only (the test extra installs libtpu for AOT plans, which would
otherwise make every JAX process probe for a TPU), and the repo root on sys.path."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
