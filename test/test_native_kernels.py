"""The compiled mish loops (offline_training/algos/native.py): values, edges, when they are off."""

import os
import shutil

from offline_training.algos import native
from offline_training.algos.networks import mish
import pytest
import torch
import torch.nn.functional as F


@pytest.fixture
def fresh_build(monkeypatch):
    """Build the library again under this test's environment; rebuild normally afterwards."""
    native.reset()
    yield monkeypatch
    monkeypatch.undo()
    native.reset()


def _compiler_present() -> bool:
    return shutil.which((os.environ.get(native.COMPILER) or 'cc').split()[0]) is not None


# Without a C compiler the loops cannot exist (torch's operators serve, tested below); with one,
# a failed build fails these tests and test_the_kernels_build_wherever_there_is_a_compiler.
needs_compiler = pytest.mark.skipif(not _compiler_present(),
                                    reason='no C compiler (cc or $CC) on this machine')


def _reference(x: torch.Tensor, grad: torch.Tensor):
    """Return mish(x) and grad * its derivative in float64, by torch's textbook formula."""
    x64 = x.double().requires_grad_(True)
    value = x64 * torch.tanh(F.softplus(x64))
    (slope,) = torch.autograd.grad(value, x64, grad.double())
    return value.detach(), slope


@needs_compiler
def test_the_kernels_build_wherever_there_is_a_compiler():
    assert native.library() is not None, native.status()
    assert native.status().startswith('native kernels: mish (built with')


@needs_compiler
def test_native_mish_matches_float64_over_the_whole_range():
    x = torch.linspace(-100.0, 100.0, 400_001)
    grad = torch.linspace(-3.0, 3.0, 400_001).flip(0)
    value, slope = _reference(x, grad)
    # the same accuracy as the sigmoid form in torch's operators (test_algos)
    assert (native.mish_forward(x).double() - value).abs().max() < 2.5e-6
    assert (native.mish_backward(x, grad).double() - slope).abs().max() < 1e-5
    # edges as torch's mish: NaN stays NaN, +inf stays inf, -inf is NaN (-inf * 0), the
    # saturated tails are exact
    edges = torch.tensor([float('nan'), float('inf'), -float('inf'), 0.0, 100.0, -100.0, 89.0])
    out = native.mish_forward(edges)
    assert out[0].isnan() and out[1] == float('inf') and out[2].isnan()
    assert out[3] == 0.0 and out[4] == 100.0 and out[5].abs() < 1e-30 and out[6] == 89.0
    # any shape and layout; an empty tensor
    block = torch.randn(64, 33)
    assert torch.equal(native.mish_forward(block.t()), native.mish_forward(block).t())
    assert torch.equal(native.mish_backward(block.t(), block.t()),
                       native.mish_backward(block, block).t())
    assert native.mish_forward(torch.empty(0, 5)).shape == (0, 5)


@needs_compiler
def test_mish_takes_the_loops_on_one_thread_and_torch_operators_on_more():
    x = torch.randn(128, 64, requires_grad=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loops = mish(x)
        # first derivatives only, as the torch form: a second backward pass raises
        (first,) = torch.autograd.grad(mish(x).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            first.sum().backward()
        torch.set_num_threads(2)
        operators = mish(x)
    finally:
        torch.set_num_threads(threads)
    assert type(loops.grad_fn).__name__ == '_NativeMishBackward'
    assert type(operators.grad_fn).__name__ == '_SigmoidMishBackward'
    grad = torch.randn_like(x)
    (g_loops,) = torch.autograd.grad(loops, x, grad)
    (g_operators,) = torch.autograd.grad(operators, x, grad)
    assert (loops - operators).abs().max() < 2e-6
    assert (g_loops - g_operators).abs().max() < 1e-5


@needs_compiler
def test_native_functions_refuse_what_they_would_misread():
    with pytest.raises(ValueError, match='float32 CPU tensors, got torch.float64'):
        native.mish_forward(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(ValueError, match='float32 CPU tensors, got torch.int8'):
        native.mish_backward(torch.zeros(3), torch.zeros(3, dtype=torch.int8))
    with pytest.raises(ValueError, match=r'gradient shape \(4,\) differs from the input shape'):
        native.mish_backward(torch.zeros(3), torch.zeros(4))


def test_switched_off_missing_or_failing_compiler_leaves_torch_operators(fresh_build):
    x = torch.randn(32, 8, requires_grad=True)
    expected = x.detach().double() * torch.tanh(F.softplus(x.detach().double()))

    fresh_build.setenv(native.SWITCH, '0')
    assert native.library() is None
    assert native.status() == ('native kernels: off (SAFERL_NATIVE_KERNELS=0); torch operators '
                               'used')
    with pytest.raises(RuntimeError, match=r'SAFERL_NATIVE_KERNELS=0.*call networks.mish'):
        native.mish_forward(x.detach())
    y = mish(x)
    assert type(y.grad_fn).__name__ == '_SigmoidMishBackward'
    assert (y.double() - expected).abs().max() < 2e-6

    fresh_build.delenv(native.SWITCH)
    fresh_build.setenv(native.COMPILER, '/nonexistent/saferl-cc')
    native.reset()
    assert native.library() is None
    assert "no C compiler '/nonexistent/saferl-cc' on PATH" in native.status()

    fresh_build.setenv(native.COMPILER, 'false')        # runs, exits 1, writes nothing
    native.reset()
    assert native.library() is None
    assert native.status().startswith('native kernels: off (false failed: exit 1)')
    assert (mish(x).double() - expected).abs().max() < 2e-6


@needs_compiler
def test_a_wrongly_built_kernel_is_caught_by_the_self_check(fresh_build):
    # a kernel that computes x * p instead of x * p / (2 - p): it builds, and must not be used
    wrong = native.SOURCE.replace('y[i] = v * (p / (2.0f - p));', 'y[i] = v * p;')
    assert wrong != native.SOURCE
    fresh_build.setattr(native, 'SOURCE', wrong)
    assert native.library() is None
    assert 'self-check: the compiled mish is off by' in native.status()


@needs_compiler
def test_a_temporary_folder_that_cannot_map_code_loads_from_memory(fresh_build):
    # /tmp mounted noexec: dlopen of the built file fails; the bytes load from a memfd instead
    real_cdll, opened = native.ctypes.CDLL, []

    def noexec_cdll(name, *args, **kwargs):
        opened.append(str(name))
        if not str(name).startswith('/proc/self/fd/'):
            raise OSError(f'{name}: failed to map segment from shared object')
        return real_cdll(name, *args, **kwargs)
    fresh_build.setattr(native.ctypes, 'CDLL', noexec_cdll)
    assert native.library() is not None, native.status()
    assert opened[0].endswith('kernels.so') and opened[1].startswith('/proc/self/fd/')
    x = torch.linspace(-5.0, 5.0, 101)
    assert (native.mish_forward(x).double() - _reference(x, torch.ones_like(x))[0]).abs().max() \
        < 2e-6


def test_the_first_build_may_come_under_no_grad_or_inference_mode(fresh_build):
    # evaluation and sampling run under no_grad / inference_mode; the build's self-check must not
    # need autograd there
    x = torch.randn(16, 4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)                # the loops serve one thread
    try:
        with torch.inference_mode():
            y = mish(x)
        built = native.library() is not None
        native.reset()
        with torch.no_grad():
            z = mish(x)
    finally:
        torch.set_num_threads(threads)
    assert built or not _compiler_present(), native.status()
    assert torch.equal(y, z)


def test_the_run_summary_says_whether_mish_ran_in_the_loops(fresh_build):
    # nothing asked for yet: no build, and the summary says so
    assert native.run_summary().startswith('mish in torch operators (the compiled loops were '
                                           'not asked for')
    assert native._status is None                       # run_summary() built nothing
    x = torch.randn(8, 8)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        mish(x)                                         # torch operators on two threads
        assert native._status is None
        torch.set_num_threads(1)
        native.library()
        if native.library() is None:
            assert native.run_summary() == f'mish in torch operators ({native.status()})'
            return
        assert native.run_summary() == ('mish in torch operators (the compiled loops were '
                                        'built but not used)')
        mish(x)
        assert native.run_summary() == f'mish in the compiled loops ({native.status()})'
    finally:
        torch.set_num_threads(threads)


@needs_compiler
def test_a_build_that_raises_anything_leaves_torch_operators(fresh_build):
    # e.g. no usable temporary folder: mish must still work, and say why the loops are off
    def no_folder(*args, **kwargs):
        raise FileNotFoundError('No usable temporary directory found')
    fresh_build.setattr(native.tempfile, 'TemporaryDirectory', no_folder)
    assert native.library() is None
    assert native.status() == ('native kernels: off (build failed: FileNotFoundError: No usable '
                               'temporary directory found); torch operators used')
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y = mish(torch.linspace(-3.0, 3.0, 7, requires_grad=True))
    finally:
        torch.set_num_threads(threads)
    assert type(y.grad_fn).__name__ == '_SigmoidMishBackward'
