"""The machine a figure was measured on: ``machine_info()`` (benchmarks, evaluations, results)."""

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
        try:
            info[module] = str(__import__(module).__version__)  # torch's is a str subclass
        except (ImportError, AttributeError):
            info[module] = None
    info['gpu'] = None
    if 'torch' in sys.modules:   # name the GPU only where torch is loaded already (no import cost)
        torch = sys.modules['torch']
        if torch.cuda.is_available():
            info['gpu'] = torch.cuda.get_device_name(0)
    return info
