"""
FISOR iterations with torch's own kernels against the project's, side by side in one run.

    python bench/bench_fisor_kernels.py [--preset cpu] [--seconds 4] [--rounds 3] [--threads 1]
                                        [--kernels-only]

Seven choices in the training code are measured, each alone and together, against torch's
defaults and the plain order of the computation:

- mish: ``networks.mish`` (the sigmoid form with its derivative written out, in torch's
  operators) against ``torch.nn.functional.mish``;
- native kernels: the compiled loops of ``native`` when this machine can build them (mish in
  one loop each way, the Adam step with the Polyak average of a target or EMA network in the
  same pass, dropout masks from a Philox generator); otherwise that row equals 'project mish';
- Adam: torch's fused kernel (``infrastructure.adam``) against torch's default on a CPU, a
  Python loop over the parameter tensors;
- shared forwards (joint iterations only): the target critics and the values evaluated once
  for the first actor half and the critic update (``FisorTrainer.share_forwards``), against
  evaluating them in both, as the iteration reads when written out step by step;
- uniform dropout: ``diffusion.dropout`` (the mask as uniform >= p) against ``F.dropout``;
- step table: the actor's time condition computed once per distinct diffusion step and gathered
  (``EpsilonNet.time_condition`` with ``num_steps``) against computing it on every row;
- one-node networks: the actor's MLPResNet and the critics' ReLU ensembles as one autograd node
  each with the backward written out (``backward_written_out``; with the project's mish, which
  that backward takes) against autograd through their modules.

First the kernels alone, each beside torch's (median microseconds per call): mish forward and
forward + backward on a [256, 512] activation (the `cpu` actor's inner layer at batch 256), the
sigmoid form in torch's operators against the native loops, one optimiser step for the `cpu`
preset's actor and for a 256 x 256 Q ensemble, the actor's step with its EMA (torch's fused
step and soft_update against the compiled loop), a [256, 128] dropout mask, and a forward +
backward of the actor's MLPResNet and of a Q ensemble (modules against one node). Then (unless
``--kernels-only``) whole iterations: each variant builds its own FISOR model and trainer (same
seed, synthetic data with the task's dimensions) and times three kinds of iteration: a
critic-only one (critics-first, phase 1), an actor-only one (phase 2, weighted sampling) and a
joint one (the paper's schedule). Variants are timed in turns, ``--rounds`` times, so a change
of machine load hits them alike; the table gives the median rate (iterations per CPU-second of
the process) and its ratio to torch's defaults.
Prints the machine.
"""

import argparse
import contextlib
import copy
import os
import statistics
import time
from unittest import mock

from offline_training.algos import diffusion, fisor, native, networks
from offline_training.algos.batching import ReplayBuffer
from offline_training.algos.diffusion import EpsilonNet
from offline_training.algos.infrastructure import adam, set_seed
from offline_training.algos.networks import QEnsemble
from offline_training.data.synthetic import synthetic_dataset
from offline_training.machine import machine_info
from saferl_ros.tasks import get_task
import torch
import torch.nn.functional as F

VARIANTS = ('torch defaults', 'project mish', 'native kernels', 'fused Adam', 'shared forwards',
            'uniform dropout', 'step table', 'one-node networks', 'project (all) but native',
            'project (all)')
ALL = ('project (all) but native', 'project (all)')
PHASES = ('critic-only', 'actor-only', 'joint')


def _loop_adam(cls):
    """Return ``cls`` forced to torch's per-tensor loop (neither fused nor foreach)."""
    def make(params, **kwargs):
        return cls(params, **{**kwargs, 'fused': None, 'foreach': False})
    return make


def _torch_dropout(x, p, training):
    return F.dropout(x, p, training)


def _per_row_condition(net, t):
    return net.cond(net.time_features(t))


@contextlib.contextmanager
def variant(name: str):
    """Patch the training code to the kernels of ``name`` while the block runs."""
    patches = []
    if name not in ('project mish', 'native kernels', 'one-node networks', *ALL):
        patches += [mock.patch.object(networks, 'mish', F.mish),
                    mock.patch.object(diffusion, 'mish', F.mish)]
    if name not in ('native kernels', 'project (all)'):
        patches.append(mock.patch.object(native, 'library', lambda: None))
    if name not in ('one-node networks', *ALL):
        patches += [mock.patch.object(diffusion.MLPResNet, 'backward_written_out', False),
                    mock.patch.object(networks.EnsembleMLP, 'backward_written_out', False)]
    if name not in ('fused Adam', *ALL):
        patches += [mock.patch.object(torch.optim, 'Adam', _loop_adam(torch.optim.Adam)),
                    mock.patch.object(torch.optim, 'AdamW', _loop_adam(torch.optim.AdamW))]
    if name not in ('shared forwards', *ALL):
        patches.append(mock.patch.object(fisor.FisorTrainer, 'share_forwards', False))
    if name not in ('uniform dropout', *ALL):
        patches.append(mock.patch.object(diffusion, 'dropout', _torch_dropout))
    if name not in ('step table', *ALL):
        patches.append(mock.patch.object(diffusion.EpsilonNet, 'time_condition',
                                         _per_row_condition))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        yield


def microseconds(call, repeats: int = 200) -> float:
    """Return the median time of ``call()`` in microseconds over ``repeats`` timed calls."""
    for _ in range(10):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def kernel_rows(task, preset: str):
    """Yield (kernel, torch's us, the project's us): mish, optimiser steps, masks, networks."""
    x = torch.randn(256, 512, requires_grad=True)
    grad = torch.randn(256, 512)

    def forward_backward(activation):
        def call():
            activation(x).backward(grad)
            x.grad = None
        return call
    with torch.no_grad():
        yield ('mish forward [256, 512]', microseconds(lambda: F.mish(x)),
               microseconds(lambda: networks.mish(x)))
    yield ('mish forward + backward', microseconds(forward_backward(F.mish)),
           microseconds(forward_backward(networks.mish)))
    if native.library() is not None:
        def torch_form(tensor):
            with mock.patch.object(native, 'library', lambda: None):
                return networks.mish(tensor)
        with torch.no_grad():
            yield ('mish forward, sigmoid form: torch operators vs native loop',
                   microseconds(lambda: torch_form(x)), microseconds(lambda: networks.mish(x)))
        yield ('mish forward + backward, same', microseconds(forward_backward(torch_form)),
               microseconds(forward_backward(networks.mish)))
    config = fisor.make_config(preset)
    nets = {'Adam step, actor': EpsilonNet(task.obs_dim, task.act_dim, config.actor_hidden,
                                           config.actor_blocks),
            'Adam step, Q ensemble': QEnsemble(task.obs_dim, task.act_dim,
                                               config.critic_hidden)}
    for label, net in nets.items():
        for param in net.parameters():
            param.grad = torch.randn_like(param)
        loop = torch.optim.Adam(net.parameters(), lr=1e-9, foreach=False)
        fused = adam(net.parameters(), lr=1e-9)
        yield label, microseconds(loop.step), microseconds(fused.step)
    actor = nets['Adam step, actor']
    if native.library() is not None:
        average = copy.deepcopy(actor)
        fused = adam(actor.parameters(), lr=1e-9, weight_decay=0.0)

        def torch_step():
            fused.step()
            networks.soft_update(average, actor, 1e-3)
        torch_step()                                  # the optimiser's state exists
        yield ('Adam step + EMA, actor: torch fused + soft_update vs compiled loop',
               microseconds(torch_step),
               microseconds(lambda: native.adam_step(fused, average.parameters(), 1e-3)))
        mask_like = torch.empty(256, config.actor_hidden)

        def torch_mask():
            with mock.patch.object(native, 'library', lambda: None):
                return diffusion.dropout_mask(mask_like, 0.1)
        yield (f'dropout mask [256, {config.actor_hidden}]: torch.rand_like vs Philox loop',
               microseconds(torch_mask), microseconds(lambda: diffusion.dropout_mask(mask_like,
                                                                                     0.1)))
    body = actor.body.train()
    rows = torch.randn(256, body.inp.in_features)
    critic = nets['Adam step, Q ensemble'].net
    states = torch.randn(256, critic.net[0].in_features)
    for label, net, inputs in (('MLPResNet forward + backward, actor', body, rows),
                               ('Q ensemble forward + backward', critic, states)):
        def step(net=net, inputs=inputs):
            net(inputs).sum().backward()

        def by_modules(net=net, inputs=inputs):
            with mock.patch.object(type(net), 'backward_written_out', False):
                step(net, inputs)
        yield f'{label}: modules vs one node', microseconds(by_modules), microseconds(step)


def make_trainer(phase: str, preset: str, task, buffer_data):
    """Return a trainer whose next updates are iterations of ``phase``."""
    set_seed(0)
    schedule = 'joint' if phase == 'joint' else 'critics-first'
    # critic-only: a critic phase longer than the timing; actor-only: a short one, run through
    critic_steps = 10 if phase == 'actor-only' else 999_999
    config = fisor.resolve_config(fisor.make_config(
        preset, schedule=schedule, steps=1_000_000, critic_steps=critic_steps,
        compiled_steps='never'), task)      # the eager kernels are what this bench compares
    buffer = ReplayBuffer(fisor.prepare_arrays(buffer_data, config), torch.device('cpu'))
    model = fisor.build_model(task.obs_dim, task.act_dim, config)
    trainer = fisor.make_trainer(model, config)
    model.train()
    if phase == 'actor-only':
        for _ in range(config.critic_steps):      # through the critic phase
            trainer.update(buffer)
    return trainer, buffer


def time_updates(trainer, buffer, seconds: float) -> float:
    """
    Return the iterations per CPU-second of ``trainer`` over about ``seconds`` of CPU time.

    CPU time of this process, not wall time: with one thread it is the time the iterations took
    on a core, so the time other jobs hold the cores (training runs beside the benchmark) does
    not count as the variant's.
    """
    for _ in range(3):
        trainer.update(buffer)
    iters, start = 0, time.process_time()
    while iters < 5 or time.process_time() - start < seconds:
        trainer.update(buffer)
        iters += 1
    return iters / (time.process_time() - start)


def main(argv=None) -> int:
    """Run the comparison and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--task', default='BallCircle')
    parser.add_argument('--preset', default='cpu', choices=sorted(fisor.PRESETS))
    parser.add_argument('--seconds', type=float, default=4.0,
                        help='CPU seconds per case and round')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    parser.add_argument('--kernels-only', action='store_true',
                        help='time the kernels alone, not whole iterations')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    task = get_task(args.task)
    data = synthetic_dataset(task.name, episodes=-(-100_000 // task.horizon),
                             max_length=task.horizon, fixed_length=True, terminal_fraction=0)
    info = machine_info()
    print(f"CPU: {info['cpu']}, {info['cores']} logical cores, torch {info['torch']}, "
          f"threads {args.threads}, Python {info['python']}")
    print(native.status())
    print(f'FISOR preset {args.preset}, task {task.name}, {args.rounds} rounds x '
          f'{args.seconds:g} s per case, load average before: '
          f'{", ".join(f"{x:.2f}" for x in os.getloadavg())}\n')
    print(f'| kernel ({args.preset} sizes) | torch us | project us | x |')
    print('|---|---:|---:|---:|')
    for label, torch_us, project_us in kernel_rows(task, args.preset):
        print(f'| {label} | {torch_us:.0f} | {project_us:.0f} | {torch_us / project_us:.2f} |')
    print()
    if args.kernels_only:
        return 0
    rates = {(v, p): [] for v in VARIANTS for p in PHASES}
    trainers = {}
    for name in VARIANTS:
        with variant(name):
            for phase in PHASES:
                trainers[name, phase] = make_trainer(phase, args.preset, task, data)
    for _ in range(args.rounds):
        for phase in PHASES:
            for name in VARIANTS:
                with variant(name):
                    rates[name, phase].append(time_updates(*trainers[name, phase],
                                                           args.seconds))
    print('| variant | ' + ' | '.join(f'{p} it/CPU-s (x)' for p in PHASES) + ' |')
    print('|---|' + '---:|' * len(PHASES))
    for name in VARIANTS:
        cells = []
        for phase in PHASES:
            rate = statistics.median(rates[name, phase])
            base = statistics.median(rates['torch defaults', phase])
            cells.append(f'{rate:.1f} ({rate / base:.2f})')
        print(f'| {name} | ' + ' | '.join(cells) + ' |')
    print(f'\nload average after: {", ".join(f"{x:.2f}" for x in os.getloadavg())}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
