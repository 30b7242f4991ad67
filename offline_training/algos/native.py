"""
Elementwise kernels in C, compiled on first use with this machine's C compiler.

mish is the actor's activation (FISOR's and DRCORL's MLP-ResNet). In torch's operators it takes
six passes over the activation forward and five backward (``networks._SigmoidMish``); XLA, which
the official FISOR code runs on, fuses it into one loop each way. The two loops here do the
same: forward reads x and writes mish(x); backward reads x and the incoming gradient and writes
the gradient (recomputing the sigmoid instead of storing it). On a [256, 512] activation that is
~75 us forward and ~90 us backward against ~200 and ~270 us for the torch form, on one thread
(``python bench/bench_fisor_kernels.py --kernels-only``). Same formula as ``_SigmoidMish``: with
s = sigmoid(x), p = s (2 - s), tanh(softplus(x)) = p / (2 - p); exp written as a polynomial so
that the compiler vectorises the loop (max error against float64 over [-100, 100] the same as
the torch form's, 2e-6 forward and 4e-6 backward).

The library is built once per process into a private temporary folder (removed as soon as it is
loaded, from an in-memory copy where that folder may not map code: nothing is cached on disk,
so nothing on disk can be swapped for it) and checked against float64 on a probe before use.
When there is no compiler, the build or the check fails, or ``SAFERL_NATIVE_KERNELS=0`` is set,
``library()`` returns None and the callers use torch's operators; ``status()`` says which, and
why, and ``run_summary()`` whether mish did run in the loops (saferl-train's summary.yaml).
"""

import ctypes
import os
from pathlib import Path
import shlex
import shutil
import subprocess
import tempfile
import threading
from typing import Optional

import torch

SWITCH = 'SAFERL_NATIVE_KERNELS'     # '0' turns the kernels off
COMPILER = 'CC'                      # the compiler to use (default: cc on PATH)
BUILD_TIMEOUT_S = 120

# exp(a) for a <= 0 as 2^k exp(r), |r| <= ln 2 / 2, with a degree-6 polynomial for exp(r)
# (Cody-Waite reduction, rounding by the 1.5 * 2^23 shift so that the loop vectorises without
# -ffast-math, which would assume there are no NaN). Below -87 it returns 0, so that mish of a
# very negative x is -0 and mish(-inf) is NaN, as torch's.
SOURCE = r"""
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float exp_nonpositive(float a)
{
    float c = a >= -87.0f ? a : -87.0f;           /* NaN too: no NaN reaches the int cast */
    float k = (c * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = c - k * 0.693359375f + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return a >= -87.0f ? p * scale : 0.0f;       /* NaN x still gives NaN: v * 0 */
}

/* sigmoid(v) from e = exp(-|v|), without overflow */
static inline float sigmoid_from(float v, float e)
{
    return (v >= 0.0f ? 1.0f : e) / (1.0f + e);
}

void saferl_mish_forward(const float *restrict x, float *restrict y, ptrdiff_t n)
{
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; ++i) {
        float v = x[i];
        float s = sigmoid_from(v, exp_nonpositive(-__builtin_fabsf(v)));
        float p = s * (2.0f - s);
        y[i] = v * (p / (2.0f - p));
    }
}

/* d mish / dx = t + x s (1 - t^2), t = tanh(softplus(x)) */
void saferl_mish_backward(const float *restrict x, const float *restrict grad,
                          float *restrict out, ptrdiff_t n)
{
#pragma omp simd
    for (ptrdiff_t i = 0; i < n; ++i) {
        float v = x[i];
        float s = sigmoid_from(v, exp_nonpositive(-__builtin_fabsf(v)));
        float p = s * (2.0f - s);
        float t = p / (2.0f - p);
        out[i] = grad[i] * (t + v * s * (1.0f - t * t));
    }
}
"""
FLAGS = ('-O3', '-fPIC', '-shared', '-fopenmp-simd', '-fno-math-errno')
# Tuned for this CPU where the compiler knows it; built without it otherwise.
MACHINE_FLAGS = (('-march=native',), ())

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_status: Optional[str] = None
_used = False            # set when mish ran in the loops in this process


def library() -> Optional[ctypes.CDLL]:
    """Return the compiled kernels (built on the first call), or None where they are off."""
    global _library, _status
    if _status is None:
        with _lock:
            if _status is None:
                _library, _status = _load()
    return _library


def status() -> str:
    """Return one line: the kernels in use and how they were built, or why they are not."""
    library()
    return _status


def reset() -> None:
    """Forget the library, so that the next call builds it again (tests; after changing CC)."""
    global _library, _status, _used
    with _lock:
        _library, _status, _used = None, None, False


def run_summary() -> str:
    """
    Return one line for a run's summary: whether mish ran in the compiled loops in this process.

    Builds nothing: a run that never asked for the loops (a GPU, more than one thread, no mish)
    says so.
    """
    if _used:
        return f'mish in the compiled loops ({_status})'
    if _status is None:
        return ('mish in torch operators (the compiled loops were not asked for: no float32 '
                'CPU mish on one thread in this run)')
    if _library is None:
        return f'mish in torch operators ({_status})'
    return 'mish in torch operators (the compiled loops were built but not used)'


def _load():
    try:
        return _build()
    except Exception as error:  # noqa: B902 - any failure leaves torch's operators, said why
        return None, (f'native kernels: off (build failed: {type(error).__name__}: '
                      f'{str(error)[:200]}); torch operators used')


def _build():
    if os.environ.get(SWITCH, '1').strip() == '0':
        return None, f'native kernels: off ({SWITCH}=0); torch operators used'
    command = shlex.split(os.environ.get(COMPILER) or 'cc')
    if not command or shutil.which(command[0]) is None:
        return None, (f'native kernels: off (no C compiler {command[0] if command else ""!r} '
                      f'on PATH; set {COMPILER}); torch operators used')
    errors = []
    with tempfile.TemporaryDirectory(prefix='saferl-kernels-') as folder:
        source, target = Path(folder) / 'kernels.c', Path(folder) / 'kernels.so'
        source.write_text(SOURCE)
        for machine in MACHINE_FLAGS:
            try:
                run = subprocess.run([*command, *FLAGS, *machine, '-o', str(target), str(source)],
                                     capture_output=True, text=True, errors='replace',
                                     timeout=BUILD_TIMEOUT_S)
            except (OSError, subprocess.TimeoutExpired) as error:
                errors.append(f'{error}')
                continue
            if run.returncode != 0:
                errors.append((run.stderr.strip().splitlines() or [f'exit {run.returncode}'])[0])
                continue
            try:
                lib = _open(target)
            except OSError as error:
                errors.append(f'{error}')
                continue
            _declare(lib)
            problem = _self_check(lib)
            if problem:                       # the portable build may still be right
                errors.append(problem)
                continue
            flags = ' '.join((*FLAGS[:1], *machine))
            return lib, f'native kernels: mish (built with {command[0]} {flags})'
    if errors[-1].startswith('self-check'):
        return None, f'native kernels: off ({errors[-1]}); torch operators used'
    return None, (f'native kernels: off ({command[0]} failed: {errors[-1][:200]}); '
                  'torch operators used')


def _open(path: Path) -> ctypes.CDLL:
    """
    Load the built library; it stays mapped after its folder is deleted.

    Where the temporary folder's file system forbids mapping code from it (mounted noexec), the
    bytes are loaded from an anonymous in-memory file instead (Linux memfd), which no mount
    option covers.
    """
    try:
        return ctypes.CDLL(str(path))
    except OSError as first:
        if not hasattr(os, 'memfd_create'):
            raise
        descriptor = os.memfd_create('saferl-kernels')
        try:
            os.write(descriptor, path.read_bytes())
            return ctypes.CDLL(f'/proc/self/fd/{descriptor}')
        except OSError as second:
            raise OSError(f'{first}; from memory: {second}') from None
        finally:
            os.close(descriptor)


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size = ctypes.c_void_p, ctypes.c_ssize_t
    lib.saferl_mish_forward.argtypes = [pointer, pointer, size]
    lib.saferl_mish_forward.restype = None
    lib.saferl_mish_backward.argtypes = [pointer, pointer, pointer, size]
    lib.saferl_mish_backward.restype = None


def _self_check(lib: ctypes.CDLL) -> Optional[str]:
    """Compare the kernels with the float64 formula on a probe; return the problem or None."""
    x = torch.linspace(-30.0, 30.0, 4001)
    grad = torch.linspace(-1.0, 1.0, 4001)
    # mish and its derivative written out in float64 (no autograd: the first call may come
    # under no_grad or inference_mode): tanh(sp) + x sigmoid(x) (1 - tanh(sp)^2), sp = softplus
    x64 = x.double()
    soft_tanh = torch.tanh(torch.nn.functional.softplus(x64))
    value = x64 * soft_tanh
    slope = grad.double() * (soft_tanh + x64 * torch.sigmoid(x64) * (1 - soft_tanh ** 2))
    forward, backward = _forward(lib, x), _backward(lib, x, grad)
    error = max(float((forward.double() - value).abs().max()),
                float((backward.double() - slope).abs().max()))
    if not error <= 1e-4:                               # NaN fails too
        return f'self-check: the compiled mish is off by {error:.3g} from float64'
    return None


def _elementwise(kernel, *inputs: torch.Tensor) -> torch.Tensor:
    """Run ``kernel(inputs..., out, n)`` on contiguous float32 CPU copies; return ``out``."""
    for tensor in inputs:
        # the kernels read raw float32 memory: anything else would be read wrongly or past its end
        if tensor.dtype != torch.float32 or tensor.device.type != 'cpu':
            raise ValueError(f'native mish takes float32 CPU tensors, got {tensor.dtype} on '
                             f'{tensor.device}; use networks.mish, which picks the kernel')
    inputs = [tensor.contiguous() for tensor in inputs]
    out = torch.empty_like(inputs[0])
    kernel(*(tensor.data_ptr() for tensor in inputs), out.data_ptr(), out.numel())
    return out


def _forward(lib: ctypes.CDLL, x: torch.Tensor) -> torch.Tensor:
    return _elementwise(lib.saferl_mish_forward, x)


def _backward(lib: ctypes.CDLL, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return _elementwise(lib.saferl_mish_backward, x, grad)


def _available() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise RuntimeError(f'{_status}: call networks.mish, which falls back to them')
    return lib


def mish_forward(x: torch.Tensor) -> torch.Tensor:
    """Return mish(x) for a float32 CPU tensor (the library must be available)."""
    global _used
    lib = _available()
    _used = True
    return _forward(lib, x)


def mish_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Return grad * d mish(x) / dx for float32 CPU tensors of one shape."""
    if grad.shape != x.shape:
        raise ValueError(f'mish_backward: gradient shape {tuple(grad.shape)} differs from the '
                         f'input shape {tuple(x.shape)}')
    return _backward(_available(), x, grad)
