"""The machine a figure was measured on: ``machine_info()`` (benchmarks, evaluations, results)."""

from importlib import metadata
import os
import platform
import sys

import numpy as np


def machine_info() -> dict:
    """Return the CPU model, core count and library versions (for every measured figure)."""
    cpu = platform.processor() or 'unknown'
    try:
        with open('/proc/cpuinfo') as stream:
            for line in stream:
                if line.startswith('model name'):
                    cpu = line.split(':', 1)[1].strip()
                    break
    except OSError:
        pass
    info = {'cpu': cpu, 'cores': os.cpu_count(), 'platform': platform.platform(),
            'python': platform.python_version(), 'numpy': np.__version__}
    for module in ('torch', 'onnxruntime', 'pybullet'):
        # The installed version from the package metadata, without importing it: evaluating a
        # bundle must not load torch (seconds and hundreds of MB) only to name its version.
        try:
            info[module] = metadata.version(module)
        except metadata.PackageNotFoundError:
            info[module] = None
    info['gpu'] = None
    # Name the GPU only where this process already uses CUDA: no import, no CUDA start-up, and
    # no GPU recorded for a CPU run on a GPU machine.
    torch = sys.modules.get('torch')
    if torch is not None and torch.cuda.is_initialized():
        info['gpu'] = torch.cuda.get_device_name(torch.cuda.current_device())
    return info
