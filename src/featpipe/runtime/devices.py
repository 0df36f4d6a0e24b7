"""What the active Keras backend computes on: CPU or an accelerator, and how much memory it has.

Keras 3 has no backend-neutral way to ask for device memory, so this is the one module with
per-backend branches (TensorFlow, JAX, PyTorch), each optional, each falling back to
``nvidia-smi`` and finally to "CPU, unknown memory". Nothing here is needed for correctness:
it only sizes batches and worker pools.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

from featpipe.runtime.keras_import import import_keras


@dataclass(frozen=True)
class Device:
    """The device the backbone runs on."""

    kind: str  # "gpu", "tpu" or "cpu"
    name: str  # e.g. "NVIDIA H100 80GB HBM3" or "cpu"
    total_bytes: int | None = None  # accelerator memory, None when unknown (always None on CPU)
    free_bytes: int | None = None

    @property
    def accelerator(self) -> bool:
        return self.kind != "cpu"


CPU = Device("cpu", "cpu")


def _torch_device() -> Device | None:
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    return Device("gpu", torch.cuda.get_device_name(0), int(total), int(free))


def _jax_device() -> Device | None:
    import jax

    devices = [d for d in jax.devices() if d.platform != "cpu"]
    if not devices:
        return None
    d = devices[0]
    stats = {}
    try:
        stats = d.memory_stats() or {}
    except Exception:  # not every platform reports memory statistics
        pass
    total = stats.get("bytes_limit")
    free = total - stats.get("bytes_in_use", 0) if total else None
    kind = "tpu" if d.platform == "tpu" else "gpu"
    return Device(kind, getattr(d, "device_kind", d.platform), total, free)


def _tensorflow_device() -> Device | None:
    import tensorflow as tf  # only reached with KERAS_BACKEND=tensorflow

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    return Device("gpu", details.get("device_name", "gpu"))  # memory from nvidia-smi below


def _nvidia_smi() -> tuple[int, int] | None:
    """(total, free) bytes of GPU 0 as nvidia-smi reports them, or None."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
        total, free = (int(v) for v in out.splitlines()[0].split(","))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None
    return total * 2**20, free * 2**20


@functools.lru_cache(maxsize=None)
def current_device() -> Device:
    """The accelerator the active Keras backend will use, or CPU."""
    keras = import_keras()
    probe = {"torch": _torch_device, "jax": _jax_device, "tensorflow": _tensorflow_device}.get(keras.backend.backend())
    device = None
    if probe is not None:
        try:
            device = probe()
        except ImportError:
            device = None
    if device is None:
        return CPU
    if device.total_bytes is None and device.kind == "gpu":
        smi = _nvidia_smi()
        if smi:
            device = Device(device.kind, device.name, smi[0], smi[1])
    return device


def cpu_count() -> int:
    """CPUs this process may use (affinity-aware where the OS supports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_workers() -> int:
    """Decode threads: one per usable CPU core (OpenCV releases the GIL while decoding), at most 32."""
    return max(1, min(32, cpu_count()))


def physical_memory() -> int:
    """Bytes of physical memory (8 GiB when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30
