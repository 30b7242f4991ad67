"""The compiled mish loops (offline_training/algos/native.py): values, edges, when they are off."""

import ctypes
import os
import shutil
import warnings

from offline_training.algos import native
from offline_training.algos.infrastructure import adam, descend
from offline_training.algos.networks import mish, soft_update
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
    assert native.status().startswith('native kernels: mish, Adam, dropout (built with')


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
    real_dll, opened = native.ctypes.PyDLL, []

    def noexec_dll(name, *args, **kwargs):
        opened.append(str(name))
        if not str(name).startswith('/proc/self/fd/'):
            raise OSError(f'{name}: failed to map segment from shared object')
        return real_dll(name, *args, **kwargs)
    fresh_build.setattr(native.ctypes, 'PyDLL', noexec_dll)
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


def test_the_run_summary_says_which_kernels_ran_in_the_loops(fresh_build):
    # nothing asked for yet: no build, and the summary says so
    assert native.run_summary().startswith('mish, Adam and dropout in torch operators (the '
                                           'compiled loops were not asked for')
    assert native._status is None                       # run_summary() built nothing
    x = torch.randn(8, 8)
    net = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        mish(x)                                         # torch operators on two threads
        net(torch.ones(1, 3)).sum().backward()
        assert not native.adam_step(optimizer)          # nor the Adam loop
        assert native._status is None
        torch.set_num_threads(1)
        native.library()
        if native.library() is None:
            assert native.run_summary() == ('mish, Adam and dropout in torch operators '
                                            f'({native.status()})')
            return
        assert native.run_summary() == ('mish, Adam and dropout in torch operators (the '
                                        'compiled loops were built but not used)')
        assert native.adam_step(optimizer)
        assert native.run_summary() == f'Adam in the compiled loops ({native.status()})'
        mish(x)
        assert native.run_summary() == f'mish and Adam in the compiled loops ({native.status()})'
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


def _two_layer_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _loss(net: torch.nn.Module, step: int) -> torch.Tensor:
    x = torch.sin(torch.arange(48, dtype=torch.float32).reshape(8, 6) * (step + 1))
    return (net(x) ** 2).mean()


@needs_compiler
@pytest.mark.parametrize('kind, decay', [('Adam', 0.0), ('Adam', 0.05), ('AdamW', 0.05)])
def test_the_compiled_adam_step_is_torchs_update(kind, decay):
    # five steps with two parameter groups (own learning rates) and a Polyak average, against
    # torch's own step and soft_update; then torch's step carries on from the loop's state
    nets = {name: _two_layer_net(0) for name in ('loop', 'torch')}
    averages = {name: _two_layer_net(1) for name in nets}
    optimizers = {}
    for name, net in nets.items():
        groups = [{'params': net[0].parameters(), 'lr': 3e-3},
                  {'params': net[2].parameters(), 'lr': 1e-2}]
        optimizers[name] = getattr(torch.optim, kind)(groups, weight_decay=decay)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for step in range(5):
            for name, net in nets.items():
                optimizers[name].zero_grad()
                _loss(net, step).backward()
            assert native.adam_step(optimizers['loop'], averages['loop'].parameters(), 0.1)
            optimizers['torch'].step()
            soft_update(averages['torch'], nets['torch'], 0.1)
        for name, net in nets.items():              # one more step by torch for both
            optimizers[name].zero_grad()
            _loss(net, 5).backward()
            optimizers[name].step()
    finally:
        torch.set_num_threads(threads)
    for first, second in ((nets['loop'], nets['torch']), (averages['loop'], averages['torch'])):
        for a, b in zip(first.parameters(), second.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    states = [optimizers[name].state_dict()['state'] for name in nets]
    for key in states[0]:
        assert float(states[0][key]['step']) == float(states[1][key]['step']) == 6.0
        for moment in ('exp_avg', 'exp_avg_sq'):
            assert torch.allclose(states[0][key][moment], states[1][key][moment], rtol=1e-5,
                                  atol=1e-9)


@pytest.mark.parametrize('kind, decay', [('Adam', 0.0), ('Adam', 0.01), ('AdamW', 0.01)])
def test_adam_in_tensor_operations_is_torchs_update(kind, decay):
    # infrastructure.adam_update_ (the body of FISOR's compiled steps, here run eager): five
    # steps and a Polyak average on the optimizer's own state, against torch's step and
    # soft_update; torch's step carries on from the state it leaves
    from offline_training.algos.infrastructure import adam_tensors, adam_update_
    nets = {name: _two_layer_net(0) for name in ('tensor ops', 'torch')}
    averages = {name: _two_layer_net(1) for name in nets}
    optimizers = {name: getattr(torch.optim, kind)(net.parameters(), lr=3e-3, weight_decay=decay)
                  for name, net in nets.items()}
    for step in range(5):
        for name, net in nets.items():
            optimizers[name].zero_grad()
            _loss(net, step).backward()
        tensors = adam_tensors(optimizers['tensor ops'])
        grads = [p.grad for p in nets['tensor ops'].parameters()]
        adam_update_(tensors, grads, torch.tensor(3e-3),
                     [p.detach() for p in averages['tensor ops'].parameters()], 0.1)
        optimizers['torch'].step()
        soft_update(averages['torch'], nets['torch'], 0.1)
    for name, net in nets.items():
        optimizers[name].zero_grad()
        _loss(net, 5).backward()
        optimizers[name].step()
    for first, second in ((nets['tensor ops'], nets['torch']),
                          (averages['tensor ops'], averages['torch'])):
        for a, b in zip(first.parameters(), second.parameters()):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    states = [optimizers[name].state_dict()['state'] for name in nets]
    for key in states[0]:
        assert float(states[0][key]['step']) == float(states[1][key]['step']) == 6.0
        for moment in ('exp_avg', 'exp_avg_sq'):     # to rounding: 1e-6 of the moment's scale
            a, b = states[0][key][moment], states[1][key][moment]
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
    # what it does not implement is declined (None): the caller keeps torch's step
    net = _two_layer_net(0)
    assert adam_tensors(torch.optim.Adam(net.parameters(), amsgrad=True)) is None
    assert adam_tensors(torch.optim.Adam([{'params': net[0].parameters()},
                                          {'params': net[2].parameters()}])) is None
    assert adam_tensors(torch.optim.SGD(net.parameters(), lr=0.1)) is None
    hooked = torch.optim.Adam(net.parameters())
    hooked.register_step_post_hook(lambda *args: None)    # torch's step() would run it
    assert adam_tensors(hooked) is None


def _stepped_net():
    net = _two_layer_net(0)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    _loss(net, 0).backward()
    return net, optimizer


@needs_compiler
@pytest.mark.parametrize('case', ['two threads', 'amsgrad', 'maximize', 'capturable',
                                  'differentiable', 'tensor lr', 'float64', 'a missing gradient',
                                  'a strided gradient', 'a zero-tensor gradient',
                                  'a negated gradient', 'a step hook', 'an average too short',
                                  'an average of another shape', 'a transposed average',
                                  'the parameters as their own average', 'a partial state',
                                  'SGD'])
def test_the_compiled_adam_step_declines_what_it_does_not_implement(case):
    # each of these returns False with nothing changed: the caller takes torch's step
    net, optimizer = _stepped_net()
    average = [p.detach().clone() for p in net.parameters()]
    group = optimizer.param_groups[0]
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if case == 'two threads' else 1)
    try:
        if case in ('amsgrad', 'maximize', 'capturable', 'differentiable'):
            group[case] = True
        elif case == 'tensor lr':
            group['lr'] = torch.tensor(1e-2)
        elif case == 'float64':
            net.double()                                # its gradients too
        elif case == 'a missing gradient':
            net[2].bias.grad = None
        elif case == 'a strided gradient':
            weight = net[0].weight
            weight.grad = torch.zeros(weight.shape[1], weight.shape[0]).t()
        elif case == 'a zero-tensor gradient':          # no memory behind it at all
            net[2].bias.grad = torch._efficientzerotensor(net[2].bias.shape)
        elif case == 'a negated gradient':              # memory read with its sign flipped
            net[2].bias.grad = torch._neg_view(torch.ones(net[2].bias.shape))
        elif case == 'a transposed average':            # soft_update would refuse it
            average[0] = average[0].t().contiguous()
        elif case == 'a partial state':                 # torch stepped some parameters only
            grad = net[2].bias.grad
            net[2].bias.grad = None
            optimizer.step()
            net[2].bias.grad = grad
        elif case == 'a step hook':
            optimizer.register_step_post_hook(lambda *args: None)
        elif case == 'an average too short':
            average = average[:-1]
        elif case == 'an average of another shape':
            average[0] = torch.zeros(3)
        elif case == 'the parameters as their own average':
            average = list(net.parameters())
        elif case == 'SGD':
            optimizer = torch.optim.SGD(net.parameters(), lr=1e-2)
        before = [p.detach().clone() for p in net.parameters()]
        states = len(optimizer.state)
        assert not native.adam_step(optimizer, average, 0.5)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert len(optimizer.state) == states               # no state made either


def test_descend_steps_and_averages_like_torch(monkeypatch):
    # infrastructure.descend: the compiled step where it applies, torch's step and soft_update
    # where it does not (here: switched off), the same parameters either way
    results = []
    for switch in ('1', '0'):
        monkeypatch.setenv(native.SWITCH, switch)
        native.reset()
        net, average = _two_layer_net(0), _two_layer_net(1)
        optimizer = adam(net.parameters(), lr=1e-2, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.9 ** step)
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            with warnings.catch_warnings():
                warnings.simplefilter('error')          # e.g. scheduler stepped before optimizer
                for step in range(4):
                    descend(optimizer, _loss(net, step), average=(average, net, 0.2))
                    scheduler.step()
        finally:
            torch.set_num_threads(threads)
        results.append([p.detach().clone() for p in (*net.parameters(), *average.parameters())])
        assert ('Adam' in native._used) == (switch == '1' and native.library() is not None)
    monkeypatch.undo()
    native.reset()
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@needs_compiler
def test_philox_gives_its_authors_known_answers():
    # the build's self-check runs these too; a generator that failed them would not be used
    lib = native.library()
    for counter, key, expected in native.PHILOX_ANSWERS:
        words = (ctypes.c_uint32 * 4)()
        lib.saferl_philox((ctypes.c_uint32 * 4)(*counter), key, words)
        assert tuple(words) == expected


@needs_compiler
def test_dropout_masks_are_seeded_scaled_and_unbiased():
    torch.manual_seed(7)
    first = native.dropout_mask((256, 130), 0.1)
    torch.manual_seed(7)
    assert torch.equal(native.dropout_mask((256, 130), 0.1), first)    # torch's seed decides
    assert not torch.equal(native.dropout_mask((256, 130), 0.1), first)  # and moves on
    assert first.dtype == torch.float32 and first.shape == (256, 130)
    scale = torch.tensor(1.0 / 0.9, dtype=torch.float32)
    assert set(first.unique().tolist()) == {0.0, float(scale)}
    # keep fraction within 5 standard deviations of 0.9 over 33 280 draws, for a whole
    # block and for each of the four words of a Philox block (columns of a width-4 mask)
    assert abs(float((first > 0).float().mean()) - 0.9) < 5 * (0.09 / first.numel()) ** 0.5
    words = native.dropout_mask((20_000, 4), 0.5) > 0
    assert all(abs(float(words[:, j].float().mean()) - 0.5) < 5 * (0.25 / 20_000) ** 0.5
               for j in range(4))
    # neighbours are independent: agreement of adjacent entries ~ p^2 + (1 - p)^2 = 0.5
    flat = words.reshape(-1)
    agree = float((flat[1:] == flat[:-1]).float().mean())
    assert abs(agree - 0.5) < 5 * (0.25 / flat.numel()) ** 0.5
    # every length, including the tail after the last whole block of four
    for n in range(10):
        mask = native.dropout_mask((n,), 0.25)
        assert mask.shape == (n,) and bool(((mask == 0) | (mask == 1 / 0.75)).all())
    assert bool((native.dropout_mask((64,), 0.0) == 1.0).all())
    for p in (-0.1, 1.0, float('nan')):
        with pytest.raises(ValueError, match='dropout probability'):
            native.dropout_mask((4,), p)


@needs_compiler
def test_dropout_takes_the_philox_masks_on_one_thread_and_torch_elsewhere():
    from offline_training.algos.diffusion import dropout_mask
    x = torch.zeros(64, 32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        torch.manual_seed(3)
        ours = dropout_mask(x, 0.2)
        torch.manual_seed(3)
        assert torch.equal(ours, native.dropout_mask(x.shape, 0.2))
        torch.set_num_threads(2)
        torch.manual_seed(3)
        theirs = dropout_mask(x, 0.2)
        torch.manual_seed(3)
        assert torch.equal(theirs, torch.rand_like(x).ge_(0.2).mul_(1 / 0.8))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(dropout_mask(x.double(), 0.0), torch.ones_like(x.double()))
