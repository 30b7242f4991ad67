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
import math
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
KERNELS = ('mish', 'Adam', 'dropout')   # what the library holds, in the order summaries name them

# exp(a) for a <= 0 as 2^k exp(r), |r| <= ln 2 / 2, with a degree-6 polynomial for exp(r)
# (Cody-Waite reduction, rounding by the 1.5 * 2^23 shift so that the loop vectorises without
# -ffast-math, which would assume there are no NaN). Below -87 it returns 0, so that mish of a
# very negative x is -0 and mish(-inf) is NaN, as torch's.
SOURCE = r"""
#include <math.h>
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

/* Philox4x32-10 (Salmon et al., SC 2011): four 32-bit words from a 128-bit counter and a
   64-bit key in ten rounds (the counter-based generator of torch's and JAX's GPU kernels).
   Written on scalars so that a loop over counters vectorises (32 x 32 -> 64-bit products). */
#define PHILOX_ROUND(c0, c1, c2, c3, k0, k1) do {                                          \
        uint64_t p0_ = (uint64_t)0xD2511F53u * (c0), p1_ = (uint64_t)0xCD9E8D57u * (c2);   \
        uint32_t n0_ = (uint32_t)(p1_ >> 32) ^ (c1) ^ (k0);                                \
        uint32_t n2_ = (uint32_t)(p0_ >> 32) ^ (c3) ^ (k1);                                \
        (c1) = (uint32_t)p1_;                                                              \
        (c3) = (uint32_t)p0_;                                                              \
        (c0) = n0_;                                                                        \
        (c2) = n2_;                                                                        \
    } while (0)

#define PHILOX_10(c0, c1, c2, c3, key0, key1) do {                                         \
        uint32_t k0_ = (key0), k1_ = (key1);                                               \
        PHILOX_ROUND(c0, c1, c2, c3, k0_, k1_);                                            \
        _Pragma("GCC unroll 9")                                                            \
        for (int r_ = 1; r_ < 10; ++r_) {                                                  \
            k0_ += 0x9E3779B9u;                                                            \
            k1_ += 0xBB67AE85u;                                                            \
            PHILOX_ROUND(c0, c1, c2, c3, k0_, k1_);                                        \
        }                                                                                  \
    } while (0)

/* the generator itself, for the known-answer check */
void saferl_philox(const uint32_t *counter, uint64_t key, uint32_t *out)
{
    uint32_t c0 = counter[0], c1 = counter[1], c2 = counter[2], c3 = counter[3];
    PHILOX_10(c0, c1, c2, c3, (uint32_t)key, (uint32_t)(key >> 32));
    out[0] = c0;
    out[1] = c1;
    out[2] = c2;
    out[3] = c3;
}

/* Dropout's scaled keep mask: out[i] = scale if the top 24 bits of word i are >= threshold,
   else 0 (a uniform draw u = bits / 2^24 >= p with threshold = ceil(p 2^24), the resolution of
   torch's float32 uniform). Word i is word i % 4 of Philox4x32-10 at counter (i / 4, 0, 0, 0)
   under the 64-bit key `seed`. */
static inline float keep(uint32_t word, uint32_t threshold, float scale)
{
    return (word >> 8) >= threshold ? scale : 0.0f;
}

void saferl_dropout_mask(float *restrict out, ptrdiff_t n, uint64_t seed, uint32_t threshold,
                         float scale)
{
    uint32_t key0 = (uint32_t)seed, key1 = (uint32_t)(seed >> 32);
    ptrdiff_t full = n / 4;
#pragma omp simd
    for (ptrdiff_t b = 0; b < full; ++b) {
        uint32_t c0 = (uint32_t)b, c1 = (uint32_t)((uint64_t)b >> 32), c2 = 0u, c3 = 0u;
        PHILOX_10(c0, c1, c2, c3, key0, key1);
        out[4 * b] = keep(c0, threshold, scale);
        out[4 * b + 1] = keep(c1, threshold, scale);
        out[4 * b + 2] = keep(c2, threshold, scale);
        out[4 * b + 3] = keep(c3, threshold, scale);
    }
    if (n > 4 * full) {
        uint32_t c[4] = {(uint32_t)full, (uint32_t)((uint64_t)full >> 32), 0u, 0u};
        PHILOX_10(c[0], c[1], c[2], c[3], key0, key1);
        for (ptrdiff_t i = 4 * full; i < n; ++i)
            out[i] = keep(c[i - 4 * full], threshold, scale);
    }
}

/* One Adam or AdamW step over `count` float32 tensors, torch's update (its fused CPU kernel):
   per tensor the float32 step counter goes up by one, then with c1 = 1 - beta1^t and
   c2 = 1 - beta2^t (in double, as torch), where wd != 0
     AdamW: p = p (1 - lr wd)      Adam: g = g + wd p
     m = m + (1 - beta1) (g - m)   v = beta2 v + (1 - beta2) g^2
     p = p - (lr / c1) m / (sqrt(v) / sqrt(c2) + eps)
   and, where `average` is given, the Polyak average a = a + tau (p - a) (soft_update). The
   operations round as in torch's fused CPU kernel (the two interpolations as one fused
   multiply-add, nothing else contracted), so that the result is torch's to the last bit or
   nearly (beta1 and tau below 1/2, where torch's lerp takes this form). */
/* a + w (b - a) for a weight w below 1/2 (torch's lerp, one rounding where the machine has
   fused multiply-add, as torch's vectorised kernels) */
#ifdef __FMA__
#define LERP(a, b, w) fmaf((w), (b) - (a), (a))
#else
#define LERP(a, b, w) ((a) + (w) * ((b) - (a)))
#endif

#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void saferl_adam_step(ptrdiff_t count, float *const *param, const float *const *grad,
                      float *const *exp_avg, float *const *exp_avg_sq, float *const *step,
                      float *const *average, const ptrdiff_t *size, double lr, double beta1,
                      double beta2, double eps, double weight_decay, int decoupled, double tau)
{
#ifdef __clang__
#pragma clang fp contract(off)
#endif
    for (ptrdiff_t k = 0; k < count; ++k) {
        double t = (double)(*step[k] += 1.0f);
        float step_size = (float)(lr / (1.0 - pow(beta1, t)));
        float c2_sqrt = (float)sqrt(1.0 - pow(beta2, t));
        float b1 = (float)(1.0 - beta1), b2 = (float)beta2, b2c = (float)(1.0 - beta2);
        float e = (float)eps, l2 = (float)weight_decay;
        int decay = weight_decay != 0.0, add_l2 = decay && !decoupled, shrink = decay && decoupled;
        float factor_f = (float)(1.0 - lr * weight_decay);      /* AdamW: p (1 - lr wd) */
        float w = (float)tau;
        float *restrict p = param[k], *restrict m = exp_avg[k], *restrict v = exp_avg_sq[k];
        const float *restrict g = grad[k];
        float *restrict a = average ? average[k] : NULL;
        ptrdiff_t n = size[k];
#pragma omp simd
        for (ptrdiff_t i = 0; i < n; ++i) {
            float pi = shrink ? p[i] * factor_f : p[i];
            float gi = add_l2 ? g[i] + p[i] * l2 : g[i];
            float mi = LERP(m[i], gi, b1);
            float vi = v[i] * b2 + b2c * gi * gi;
            pi = pi + (-step_size * mi) / (sqrtf(vi) / c2_sqrt + e);
            m[i] = mi;
            v[i] = vi;
            p[i] = pi;
        }
        if (a) {
#pragma omp simd
            for (ptrdiff_t i = 0; i < n; ++i)
                a[i] = LERP(a[i], p[i], w);
        }
    }
}
"""
FLAGS = ('-O3', '-fPIC', '-shared', '-fopenmp-simd', '-fno-math-errno')
LIBRARIES = ('-lm',)                 # pow and sqrt of the Adam step's bias corrections
# Tuned for this CPU where the compiler knows it; built without it otherwise.
MACHINE_FLAGS = (('-march=native',), ())

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_status: Optional[str] = None
_used: set = set()       # the KERNELS that ran in this process


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
    global _library, _status
    with _lock:
        _library, _status = None, None
        _used.clear()


def run_summary() -> str:
    """
    Return one line for a run's summary: which kernels ran in the compiled loops in this process.

    Builds nothing: a run that never asked for the loops (a GPU, more than one thread, none of
    mish, Adam or dropout) says so.
    """
    every = _names(KERNELS)
    if _used:
        return f'{_names([name for name in KERNELS if name in _used])} in the compiled loops ' \
               f'({_status})'
    if _status is None:
        return (f'{every} in torch operators (the compiled loops were not asked for: no '
                'float32 CPU training on one thread in this run)')
    if _library is None:
        return f'{every} in torch operators ({_status})'
    return f'{every} in torch operators (the compiled loops were built but not used)'


def _names(names) -> str:
    """Join names as a sentence does: 'a', 'a and b', 'a, b and c'."""
    names = list(names)
    return names[0] if len(names) == 1 else f'{", ".join(names[:-1])} and {names[-1]}'


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
                run = subprocess.run([*command, *FLAGS, *machine, '-o', str(target), str(source),
                                      *LIBRARIES],
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
            return lib, f'native kernels: {", ".join(KERNELS)} (built with {command[0]} {flags})'
    if errors[-1].startswith('self-check'):
        return None, f'native kernels: off ({errors[-1]}); torch operators used'
    return None, (f'native kernels: off ({command[0]} failed: {errors[-1][:200]}); '
                  'torch operators used')


def _open(path: Path) -> ctypes.CDLL:
    """
    Load the built library; it stays mapped after its folder is deleted.

    As a PyDLL: its calls keep Python's global lock, so no other Python thread can free or
    resize a tensor while a loop reads or writes it. Where the temporary folder's file system
    forbids mapping code from it (mounted noexec), the bytes are loaded from an anonymous
    in-memory file instead (Linux memfd), which no mount option covers.
    """
    try:
        return ctypes.PyDLL(str(path))
    except OSError as first:
        if not hasattr(os, 'memfd_create'):
            raise
        descriptor = os.memfd_create('saferl-kernels')
        try:
            os.write(descriptor, path.read_bytes())
            return ctypes.PyDLL(f'/proc/self/fd/{descriptor}')
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
    pointers = ctypes.POINTER(ctypes.c_void_p)
    lib.saferl_adam_step.argtypes = [size, pointers, pointers, pointers, pointers, pointers,
                                     pointers, ctypes.POINTER(size), *[ctypes.c_double] * 5,
                                     ctypes.c_int, ctypes.c_double]
    lib.saferl_adam_step.restype = None
    lib.saferl_philox.argtypes = [pointer, ctypes.c_uint64, pointer]
    lib.saferl_philox.restype = None
    lib.saferl_dropout_mask.argtypes = [pointer, size, ctypes.c_uint64, ctypes.c_uint32,
                                        ctypes.c_float]
    lib.saferl_dropout_mask.restype = None


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
    error = _adam_probe_error(lib)
    if not error <= 1e-5:
        return f'self-check: the compiled Adam step is off by {error:.3g} from float64'
    for counter, key, expected in PHILOX_ANSWERS:
        words = (ctypes.c_uint32 * 4)()
        lib.saferl_philox((ctypes.c_uint32 * 4)(*counter), key, words)
        if tuple(words) != expected:
            return (f'self-check: Philox4x32-10 gave {[hex(w) for w in words]} for counter '
                    f'{[hex(w) for w in counter]}, key {key:#x}; its authors give '
                    f'{[hex(w) for w in expected]}')
    return None


# Known answers of Philox4x32-10 (Random123's kat_vectors): counter words, 64-bit key (word 1 in
# the high half), the four output words.
PHILOX_ANSWERS = (
    ((0, 0, 0, 0), 0, (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff,) * 4, 0xffffffffffffffff, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), 0x299f31d0a4093822,
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
)


def _adam_probe_error(lib: ctypes.CDLL) -> float:
    """Return the largest difference of two AdamW steps (and the average) from float64."""
    lr, beta1, beta2, eps, decay, tau = 1e-2, 0.9, 0.999, 1e-8, 0.1, 0.05
    param, mean = torch.linspace(-1.0, 1.0, 257), torch.zeros(257)
    m, v, step = torch.zeros(257), torch.zeros(257), torch.zeros(())
    p64, a64, m64, v64 = param.double(), mean.double(), m.double(), v.double()
    for t in (1, 2):
        grad = torch.sin(7.0 * t * torch.linspace(-1.0, 1.0, 257))
        lib.saferl_adam_step(1, _pointers([param]), _pointers([grad]), _pointers([m]),
                             _pointers([v]), _pointers([step]), _pointers([mean]),
                             (ctypes.c_ssize_t * 1)(257), lr, beta1, beta2, eps, decay, 1, tau)
        g64 = grad.double()
        m64 = beta1 * m64 + (1 - beta1) * g64
        v64 = beta2 * v64 + (1 - beta2) * g64 ** 2
        p64 = p64 * (1 - lr * decay) - lr / (1 - beta1 ** t) * m64 / (
            v64.sqrt() / (1 - beta2 ** t) ** 0.5 + eps)
        a64 = a64 + tau * (p64 - a64)
    return max(float((param.double() - p64).abs().max()), float((mean.double() - a64).abs().max()),
               float((m.double() - m64).abs().max()), float((v.double() - v64).abs().max()),
               abs(float(step) - 2.0))


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


def loops_apply(x: torch.Tensor) -> bool:
    """
    Whether the compiled loops take CPU tensor ``x``'s elementwise work (mish, dropout masks).

    float32, one thread (with more, torch's operators run in parallel and the loops would not)
    and the library built.
    """
    return (x.dtype == torch.float32 and x.device.type == 'cpu'
            and torch.get_num_threads() == 1 and library() is not None)


def mish_forward(x: torch.Tensor) -> torch.Tensor:
    """Return mish(x) for a float32 CPU tensor (the library must be available)."""
    lib = _available()
    _used.add('mish')
    return _forward(lib, x)


def mish_backward(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Return grad * d mish(x) / dx for float32 CPU tensors of one shape."""
    if grad.shape != x.shape:
        raise ValueError(f'mish_backward: gradient shape {tuple(grad.shape)} differs from the '
                         f'input shape {tuple(x.shape)}')
    return _backward(_available(), x, grad)


# --------------------------------------------------------------------------- the Adam step

# Adam's and AdamW's options that the compiled step does not implement: set, torch's step runs.
_ADAM_OPTIONS_NOT_COMPILED = ('amsgrad', 'maximize', 'capturable', 'differentiable')
PRESERVE = torch.preserve_format      # a new state tensor takes its parameter's layout, as torch's


def adam_step(optimizer: torch.optim.Optimizer, average=None, tau: float = 0.0) -> bool:
    """
    Take one step of a torch Adam or AdamW in the compiled loop; False where it does not apply.

    The update is torch's (``saferl_adam_step`` in the source above), on the optimizer's own
    state (``exp_avg``, ``exp_avg_sq``, float32 ``step`` counters, created as torch creates
    them on the first step), so its ``state_dict`` and torch's ``step()`` carry on from it.
    ``average``: tensors paired one to one with the optimizer's parameters (group by group) that
    are moved toward the new parameters by ``tau`` in the same pass (networks.soft_update).
    It applies to float32 contiguous CPU parameters and gradients on one thread, with float
    hyperparameters and none of amsgrad, maximize, capturable or differentiable; everything is
    checked before any pointer reaches the loop, and with anything else (or without the library)
    nothing is changed and False is returned: the caller takes torch's step.
    """
    if torch.get_num_threads() != 1 or type(optimizer) not in (torch.optim.Adam,
                                                               torch.optim.AdamW):
        return False
    if _step_hooks(optimizer):       # torch's step() runs them; this loop would not
        return False
    groups = optimizer.param_groups
    for group in groups:
        if any(group.get(name) for name in _ADAM_OPTIONS_NOT_COMPILED) or not all(
                type(value) in (int, float) for value in (group['lr'], group['eps'],
                                                          group['weight_decay'], *group['betas'])):
            return False                 # e.g. a tensor learning rate
    params = [param for group in groups for param in group['params']]
    average = None if average is None else list(average)
    if not params or (average is not None and len(average) != len(params)):
        return False
    # Every check runs on every call (a tensor's memory may have been replaced since the last):
    # the loop reads and writes each tensor's numel floats from its data pointer.
    sizes = [param.numel() for param in params]
    grads = [param.grad for param in params]
    if not (_dense(params, sizes) and _dense(grads, sizes)):
        return False
    if average is not None and not (_dense(average, sizes) and all(
            mean.shape == param.shape and mean.data_ptr() != param.data_ptr()
            for mean, param in zip(average, params))):
        return False                 # soft_update would refuse another shape
    lib = library()
    if lib is None:
        return False
    state = optimizer.state
    initial_adam_state(state, params)
    entries = [state.get(param, {}) for param in params]     # .get: state is a defaultdict
    try:
        means = [entry['exp_avg'] for entry in entries]
        squares = [entry['exp_avg_sq'] for entry in entries]
        steps = [entry['step'] for entry in entries]
    except KeyError:                 # a state that torch's step made for some parameters only
        return False
    if not (_dense(means, sizes) and _dense(squares, sizes) and _dense(steps, [1] * len(steps))):
        return False
    _used.add('Adam')
    optimizer._opt_called = True     # what torch's LR schedulers' wrapper of step() records
    first = 0
    for group in groups:
        count = len(group['params'])
        part = slice(first, first + count)
        first += count
        beta1, beta2 = group['betas']
        decoupled = (bool(group.get('decoupled_weight_decay'))
                     or type(optimizer) is torch.optim.AdamW)
        lib.saferl_adam_step(
            count, _pointers(params[part]), _pointers(grads[part]), _pointers(means[part]),
            _pointers(squares[part]), _pointers(steps[part]),
            None if average is None else _pointers(average[part]),
            (ctypes.c_ssize_t * count)(*sizes[part]), float(group['lr']), float(beta1),
            float(beta2), float(group['eps']), float(group['weight_decay']), int(decoupled),
            float(tau))
    return True


def initial_adam_state(state, params) -> None:
    """Give ``params`` the state torch makes at a first step, if none of them has a state."""
    if not any(param in state for param in params):
        for param in params:
            state[param] = {'step': torch.zeros((), dtype=torch.float32),
                            'exp_avg': torch.zeros_like(param, memory_format=PRESERVE),
                            'exp_avg_sq': torch.zeros_like(param, memory_format=PRESERVE)}


def _step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether step hooks are registered (or where torch keeps them is not known: assume so)."""
    from torch.optim import optimizer as module
    hooks = [getattr(optimizer, '_optimizer_step_pre_hooks', None),
             getattr(optimizer, '_optimizer_step_post_hooks', None),
             getattr(module, '_global_optimizer_pre_hooks', None),
             getattr(module, '_global_optimizer_post_hooks', None)]
    return any(table is None or len(table) for table in hooks)


def _dense(tensors, sizes) -> bool:
    """
    Whether each tensor is contiguous float32 CPU memory of the matching size in ``sizes``.

    Plain tensors and parameters only (a subclass may not own its memory), and none that reads
    its memory other than as it lies: torch's zero tensors (no memory at all), negated or
    conjugated views (a flag applied on reading).
    """
    try:
        return all(type(tensor) in _PLAIN and tensor.dtype is torch.float32
                   and tensor.layout is torch.strided and tensor.is_cpu
                   and tensor.is_contiguous() and tensor.numel() == size
                   and not tensor._is_zerotensor() and not tensor.is_neg()
                   and not tensor.is_conj() and (size == 0 or tensor.data_ptr() != 0)
                   for tensor, size in zip(tensors, sizes))
    except AttributeError:           # None (no gradient), or not a tensor at all
        return False


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _pointers(tensors) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[tensor.data_ptr() for tensor in tensors])


# --------------------------------------------------------------------------- dropout masks

def dropout_mask(shape, p: float) -> torch.Tensor:
    """
    Return a float32 CPU tensor of ``shape``: 1 / (1 - p) with probability 1 - p, else 0.

    Each entry compares 24 random bits with p (torch's float32 uniform has the same resolution)
    from Philox4x32-10 keyed by one 64-bit draw from torch's default generator: seeded by
    torch.manual_seed and restored with its state, as torch.rand is, but not torch.rand's
    numbers. One vectorised pass where torch.rand_like's serial Mersenne Twister took ~95 us
    for a [256, 128] mask on one thread (`python bench/bench_fisor_kernels.py --kernels-only`).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f'dropout probability must be in [0, 1), got {p}')
    lib = _available()
    _used.add('dropout')
    key = int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64))
    out = torch.empty(shape, dtype=torch.float32)
    lib.saferl_dropout_mask(out.data_ptr(), out.numel(), key, math.ceil(p * 2 ** 24),
                            1.0 / (1.0 - p))
    return out
