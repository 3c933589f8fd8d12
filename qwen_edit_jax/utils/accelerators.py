"""The command-line tools' platform default: CPU when the machine has no accelerator at all.

With libtpu installed (the `tpu-plan` and `test` extras) every JAX process on a machine without a
TPU probes for one at start-up and prints a screen of libtpu errors ("could not determine TPU
worker hostnames", "Logging before InitGoogle") before falling back to the CPU. The tools call
`cpu_unless_accelerator()` first: when the user has not set `JAX_PLATFORMS` and no accelerator
device node exists, it selects the CPU, so ordinary commands stay quiet. Anything the user sets
wins, and a machine with a TPU or GPU is left to JAX's own choice.

Device nodes rather than a JAX probe, because the probe is what prints the noise (and costs
seconds): TPUs appear as `/dev/accel*` (v2–v5e) or under `/dev/vfio/` (v5p, v6e and later, bound
to vfio-pci), NVIDIA GPUs as `/dev/nvidia<N>`, AMD GPUs as `/dev/kfd`. A false positive (a vfio
device that is not a TPU) only keeps today's behaviour; no false negative is known.
"""

from __future__ import annotations

import glob
import os
import sys

ENV = "JAX_PLATFORMS"


def accelerator_nodes(dev: str = "/dev") -> list[str]:
    """Device nodes of TPUs and GPUs on this machine (empty on a CPU-only machine)."""
    found = glob.glob(os.path.join(dev, "accel*")) + glob.glob(os.path.join(dev, "nvidia[0-9]*"))
    vfio = os.path.join(dev, "vfio")
    if os.path.isdir(vfio):
        found += [p for p in glob.glob(os.path.join(vfio, "*")) if os.path.basename(p) != "vfio"]
    if os.path.exists(os.path.join(dev, "kfd")):
        found.append(os.path.join(dev, "kfd"))
    return sorted(found)


def cpu_unless_accelerator(dev: str = "/dev") -> str | None:
    """Select the CPU platform when `JAX_PLATFORMS` is unset and no accelerator exists; return what was set.

    Call it before JAX initialises a backend (first use of devices). The variable is set for this
    process and its children; if `jax` is already imported its config is updated too.
    """
    if ENV in os.environ or accelerator_nodes(dev):
        return None
    os.environ[ENV] = "cpu"
    jax = sys.modules.get("jax")
    if jax is not None:  # imported already (this package imports it): the env var was read then
        jax.config.update("jax_platforms", "cpu")
    return "cpu"
