"""Training plumbing: real short runs, resume after a kill, deterministic seeding, the CLI."""

import os
from pathlib import Path
import platform
import re
import signal
import subprocess
import sys
import time

import numpy as np
from offline_training.algos import bcq_lag, fisor, get_algorithm, native
from offline_training.algos.batching import ReplayBuffer
from offline_training.algos.infrastructure import set_seed
from offline_training.data.dataset import write_dataset
from offline_training.data.synthetic import rollout_dataset, synthetic_dataset
from offline_training.runs import CHECKPOINT_GLOBALS, load_checkpoint, load_run, open_run
from offline_training.train import main, train
import pytest
from saferl_ros.errors import ConfigError, MissingFileError
from saferl_ros.tasks import get_task
import torch
import yaml

torch.set_num_threads(1)

TASK = 'BallCircle'
# Small networks so that a few hundred real optimisation steps take seconds on one core. FISOR
# trains jointly here (the paper's schedule; the 'cpu' preset's critics-first has its own tests).
TINY = {
    'fisor': {'actor_hidden': 64, 'actor_blocks': 1, 'actor_batch_size': 128,
              'critic_batch_size': 128, 'critic_hidden': (64, 64), 'schedule': 'joint'},
    'bc_all': {'batch_size': 128},
    'bc_safe': {'batch_size': 128, 'cost_limit': 100.0},
    'bcq_lag': {'batch_size': 64, 'vae_hidden': 64, 'actor_hidden': (64, 64),
                'critic_hidden': (64, 64)},
    # DRCORL's stages log different losses; test_drcorl.py checks them stage by stage. These
    # stage lengths put a resume at step 10 inside the critic stage, and 20 steps reach the end.
    'drcorl': {'behavior_steps': 5, 'critic_steps': 5, 'warmstart_steps': 4,
               'adaptation_steps': 6, 'behavior_batch_size': 64, 'behavior_hidden': 32,
               'behavior_blocks': 1, 'critic_batch_size': 64, 'critic_hidden': (32, 32),
               'policy_batch_size': 64, 'policy_hidden': (32, 32)},
}


@pytest.fixture(scope='module')
def dataset():
    """Ten episodes of a heuristic in the real BallCircle simulation (2000 transitions)."""
    return rollout_dataset(TASK, episodes=10, seed=0)


def _train_steps(algo, data, steps):
    set_seed(0)
    module, fixed = get_algorithm(algo)
    config = module.resolve_config(module.make_config('cpu', **TINY[algo], **fixed),
                                   get_task(TASK))
    buffer = ReplayBuffer(module.prepare_arrays(data, config), 'cpu')
    model = module.build_model(buffer.data['obs'].shape[1], buffer.data['act'].shape[1], config)
    trainer = module.make_trainer(model, config)
    history = [{k: float(v) for k, v in trainer.update(buffer).items()} for _ in range(steps)]

    def mean(key, part):
        return float(np.mean([h[key] for h in part]))
    return history, mean


def _fisor_trainer(data, **overrides):
    set_seed(0)
    config = fisor.resolve_config(fisor.make_config('cpu', **{**TINY['fisor'], **overrides}),
                                  get_task(TASK))
    buffer = ReplayBuffer(fisor.prepare_arrays(data, config), 'cpu', seed=0)
    model = fisor.build_model(buffer.data['obs'].shape[1], buffer.data['act'].shape[1], config)
    return fisor.make_trainer(model, config), buffer


def _cpp_compiler_present() -> bool:
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        get_cpp_compiler()
        return True
    except Exception:    # noqa: B902 -- torch raises its own kinds when it finds none
        return False


# torch.compile builds C++ on a CPU; without a compiler the steps run eager (the next test)
@pytest.mark.skipif(not _cpp_compiler_present(),
                    reason='no C++ compiler for torch.compile (g++ or $CXX) on this machine')
def test_compiled_steps_follow_the_eager_steps(dataset):
    # compiled_steps='always': FISOR's gradient steps (the actor's with its EMA, the values' and
    # critics' with the targets' average, Eq. 13's weights) run as programs compiled by
    # torch.compile. From one seed they draw the random numbers the eager steps draw and make
    # the same updates to rounding, on the joint schedule and in both phases of critics-first,
    # and the optimiser state they leave is torch's: an eager trainer loads it and steps on
    schedules = {'joint': {'schedule': 'joint', 'steps': 100},
                 'critics-first': {'schedule': 'critics-first', 'steps': 100,
                                   'critic_steps': 3, 'critic_check_every': 2,
                                   'actor_sampling': 'weighted-sampling'}}
    for name, schedule in schedules.items():
        runs = {}
        for mode in ('never', 'always'):
            trainer, buffer = _fisor_trainer(dataset, compiled_steps=mode, **schedule)
            logs = [trainer.update(buffer) for _ in range(5)]
            runs[mode] = (trainer, logs)
        eager, compiled = runs['never'][0], runs['always'][0]
        assert eager.compiled is None and eager.compiled_status.startswith('compiled steps: off')
        ran = 'actor, critics, weights' if name == 'joint' else 'actor, critics'
        assert compiled.compiled_status == f'compiled steps: on ({ran} compiled by torch.compile)'
        for logs_off, logs_on in zip(runs['never'][1], runs['always'][1]):
            assert logs_off.keys() == logs_on.keys()
            for key in logs_off:
                assert np.isclose(float(logs_off[key]), float(logs_on[key]), rtol=1e-3,
                                  atol=1e-5), (name, key)
        for (key, a), b in zip(eager.model.state_dict().items(),
                               compiled.model.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), (name, key)
        for opt in ('actor_opt', 'q_opt', 'v_opt'):
            state_off = getattr(eager, opt).state_dict()['state']
            state_on = getattr(compiled, opt).state_dict()['state']
            assert state_off.keys() == state_on.keys()
            for entry_off, entry_on in zip(state_off.values(), state_on.values()):
                assert entry_on['step'].dtype == torch.float32
                assert float(entry_off['step']) == float(entry_on['step']) > 0
                assert torch.allclose(entry_off['exp_avg'], entry_on['exp_avg'], rtol=1e-2,
                                      atol=1e-6)
    # the compiled run's state (model and optimisers) carries on in an eager trainer
    resumed, buffer = _fisor_trainer(dataset, compiled_steps='never', **schedules['joint'])
    resumed.model.load_state_dict(runs['always'][0].model.state_dict())
    resumed.load_state_dict(runs['always'][0].state_dict())
    before = resumed.model.actor.body.out.weight.detach().clone()
    assert all(np.isfinite(float(v)) for v in resumed.update(buffer).values())
    assert not torch.equal(before, resumed.model.actor.body.out.weight)


def test_compiled_steps_fall_back_to_eager_when_compiling_fails(dataset, monkeypatch):
    # a machine where torch.compile cannot build (no C++ compiler, say): the run goes on with
    # eager steps, warns, and says why in compiled_status (the run summary's compiled_steps);
    # nothing was drawn or stepped before the failure, so the run is the eager run exactly
    def without_a_compiler(function, **options):
        def call(*args, **kwargs):
            raise RuntimeError('no C++ compiler found\nsecond line')
        return call

    def matches_the_eager_run(compiler, schedule, iterations):
        """Train eager, then with ``compiler`` as torch.compile; check the same parameters."""
        eager, buffer = _fisor_trainer(dataset, compiled_steps='never', **schedule)
        for _ in range(iterations):
            eager.update(buffer)
        monkeypatch.setattr(torch, 'compile', compiler)
        trainer, buffer = _fisor_trainer(dataset, compiled_steps='always', **schedule)
        with pytest.warns(RuntimeWarning, match='torch.compile failed: RuntimeError: no C'):
            for _ in range(iterations):
                trainer.update(buffer)
        assert trainer.compiled is None
        for a, b in zip(eager.model.state_dict().values(), trainer.model.state_dict().values()):
            assert torch.equal(a, b)
        return trainer
    trainer = matches_the_eager_run(
        without_a_compiler, {'schedule': 'critics-first', 'steps': 100, 'critic_steps': 2}, 4)
    assert trainer.compiled_status == ('compiled steps: off (torch.compile failed: '
                                       'RuntimeError: no C++ compiler found); eager steps')
    # the actor's program failing after another ran (joint: Eq. 13's weights first, here run
    # as a plain function): the dropout masks already drawn go to the eager step, so the run
    # is still the eager run exactly

    def actor_without_a_compiler(function, **options):
        return without_a_compiler(function) if function.__name__ == '_actor_program' \
            else function
    matches_the_eager_run(actor_without_a_compiler, {'schedule': 'joint', 'steps': 100}, 3)
    # 'auto' compiles long CPU runs only; anything else is refused by name
    short, _ = _fisor_trainer(dataset, compiled_steps='auto', steps=100)
    assert short.compiled is None and 'auto: 100 iterations' in short.compiled_status
    long, _ = _fisor_trainer(dataset, compiled_steps='auto', steps=fisor.COMPILE_MIN_STEPS)
    assert long.compiled is not None
    with pytest.raises(ConfigError, match="'sometimes': use one of auto, always, never"):
        fisor.make_config('cpu', compiled_steps='sometimes')
    # a boolean (YAML's on/off on the command line) is refused with the field's type
    with pytest.raises(ConfigError, match="'compiled_steps' should be a string, found bool False"):
        fisor.make_config('cpu', compiled_steps=False)


# Loss -> the factor by which the mean of the last 30 steps must be below the first 30.
FALLING = {
    'fisor': {'loss/q_h': 2.0, 'loss/q_r': 2.0, 'loss/v_r': 2.0, 'loss/actor': 1.3},
    'bc_all': {'loss/bc': 1.05},
    'bc_safe': {'loss/bc': 1.05},
    'bcq_lag': {'loss/critic': 2.0, 'loss/cost_critic': 2.0, 'loss/vae': 1.2},
}


@pytest.mark.parametrize('algo', sorted(FALLING))
def test_short_training_run_losses_fall(algo, dataset):
    history, mean = _train_steps(algo, dataset, 300)
    for key, factor in FALLING[algo].items():
        first, last = mean(key, history[:30]), mean(key, history[-30:])
        assert np.isfinite(last)
        assert last * factor < first, f'{algo} {key}: {first:.4g} -> {last:.4g}'


def _checkpoint(run_dir):
    return load_checkpoint(Path(run_dir) / 'checkpoint.pt', 'cpu', 'FIX')  # weights only


def _assert_same_state(a, b, exact=True):
    def same(x, y):
        return torch.equal(x, y) if exact else torch.allclose(x.float(), y.float(), atol=1e-5)
    assert a['step'] == b['step']
    for key, value in a['model'].items():
        assert same(value, b['model'][key]), key

    def flatten(obj, prefix=''):
        if isinstance(obj, dict):
            for k, v in obj.items():
                yield from flatten(v, f'{prefix}/{k}')
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from flatten(v, f'{prefix}/{i}')
        else:
            yield prefix, obj
    trainer_b = dict(flatten(b['trainer']))
    for key, value in flatten(a['trainer']):
        if isinstance(value, torch.Tensor):
            assert same(value, trainer_b[key]), key
        else:
            assert value == trainer_b[key], key


@pytest.mark.parametrize('algo', ['fisor', 'bcq_lag', 'drcorl'])
def test_resume_continues_with_the_same_state(algo, dataset, tmp_path):
    kwargs = {'data': dataset, 'steps': 20, 'device': 'cpu', 'log_every': 5,
              'checkpoint_every': 5, 'overrides': TINY[algo], 'progress': False,
              'preset': 'cpu'}
    straight = train(algo, TASK, seed=0, out=tmp_path / 'straight', **kwargs)
    interrupted = tmp_path / 'interrupted'
    train(algo, TASK, seed=0, out=interrupted, stop_after=10, **kwargs)   # "killed" at 10
    assert _checkpoint(interrupted)['step'] == 10
    assert not (interrupted / 'summary.yaml').exists()
    if algo == 'fisor':   # how its gradient steps execute may change on resuming
        kwargs['overrides'] = {**TINY[algo], 'compiled_steps': 'never'}
    train(algo, TASK, seed=0, out=interrupted, **kwargs)                  # restarted
    summary = yaml.safe_load((interrupted / 'summary.yaml').read_text())
    assert summary['step'] == 20 and summary['steps_this_session'] == 10
    _assert_same_state(_checkpoint(straight), _checkpoint(interrupted))


def test_seeding_is_deterministic(dataset, tmp_path):
    kwargs = {'data': dataset, 'steps': 10, 'device': 'cpu', 'checkpoint_every': 10,
              'overrides': TINY['fisor'], 'progress': False, 'preset': 'cpu'}
    a = _checkpoint(train('fisor', TASK, seed=3, out=tmp_path / 'a', **kwargs))
    b = _checkpoint(train('fisor', TASK, seed=3, out=tmp_path / 'b', **kwargs))
    c = _checkpoint(train('fisor', TASK, seed=4, out=tmp_path / 'c', **kwargs))
    _assert_same_state(a, b)
    # the summary says how the actor's mish and the Adam steps ran: the compiled loops on one
    # thread where built
    summary = yaml.safe_load((tmp_path / 'a' / 'summary.yaml').read_text())
    if torch.get_num_threads() == 1 and native.library() is not None:
        assert summary['kernels'].startswith('mish, Adam and dropout in the compiled loops '
                                             '(native kernels: mish, Adam, dropout')
    # and why its gradient steps ran eager: 'auto' compiles runs of 20 000 iterations or more
    assert summary['compiled_steps'] == ('compiled steps: off (auto: 10 iterations, fewer than '
                                         'the 20000 that repay compiling)')
    key = 'actor.body.out.weight'
    assert not torch.equal(a['model'][key], c['model'][key])


def test_evaluation_during_training_logs_a_curve_and_changes_nothing(dataset, tmp_path):
    from offline_training.periodic_eval import read_curve
    from offline_training.training_curves import plot_eval_curves
    kwargs = {'data': dataset, 'steps': 20, 'device': 'cpu', 'checkpoint_every': 20,
              'overrides': TINY['fisor'], 'progress': False, 'preset': 'cpu'}
    plain = train('fisor', TASK, seed=0, out=tmp_path / 'plain', **kwargs)
    evaluated = tmp_path / 'evaluated'
    train('fisor', TASK, seed=0, out=evaluated, stop_after=15, eval_every=10, eval_episodes=2,
          **kwargs)                                                 # "killed" at 15
    train('fisor', TASK, seed=0, out=evaluated, eval_every=10, eval_episodes=2, **kwargs)
    # The evaluations draw from their own generators: the weights are those of a plain run.
    _assert_same_state(_checkpoint(plain), _checkpoint(evaluated))
    # ... and the global generators are where a plain run leaves them (creating the simulator
    # draws from numpy's)
    for key in ('python', 'numpy', 'torch'):
        assert repr(_checkpoint(plain)['rng'][key]) == repr(_checkpoint(evaluated)['rng'][key])
    rows = read_curve(evaluated)
    assert [r['step'] for r in rows] == [10, 20]                    # once each, after the resume
    for row in rows:
        assert row['episodes'] == 2 and row['kappa'] == 5.0
        assert row['cost_mean'] >= 0
        assert row['normalized_cost'] == pytest.approx(row['cost_mean'] / 5)
        assert row['train_cpu_s'] > 0 and np.isfinite(row['reward_mean'])
    assert rows[1]['train_cpu_s'] > rows[0]['train_cpu_s']          # summed over both sessions
    kept = sorted(p.name for p in (evaluated / 'checkpoints').iterdir())
    assert kept == ['step_000000010.pt', 'step_000000020.pt']
    # killed after the checkpoint of an evaluation step, before its copy was kept: the resume
    # keeps it
    (evaluated / 'checkpoints' / kept[1]).unlink()
    train('fisor', TASK, seed=0, out=evaluated, eval_every=10, eval_episodes=2, **kwargs)
    assert (evaluated / 'checkpoints' / kept[1]).is_file()
    assert torch.load(evaluated / 'checkpoints' / kept[0], weights_only=False)['step'] == 10
    png = plot_eval_curves([evaluated], tmp_path / 'curve.png')
    assert png.stat().st_size > 10_000
    assert rows[1]['train_wall_s'] > rows[0]['train_wall_s']        # summed over sessions too


@pytest.mark.parametrize('text', ['', 'step,reward_mean\n10,1.0\n', 'garbage\x00\xff,\n1\n'])
def test_a_damaged_eval_curve_is_one_clear_error(dataset, tmp_path, capsys, text):
    from offline_training.training_curves import main as curves_main
    kwargs = {'data': dataset, 'steps': 4, 'device': 'cpu', 'progress': False, 'preset': 'cpu',
              'overrides': TINY['fisor'], 'eval_every': 2, 'eval_episodes': 1}
    run = train('fisor', TASK, seed=0, out=tmp_path / 'run', stop_after=2, **kwargs)
    (run / 'eval_curve.csv').write_text(text)
    assert curves_main([str(run), '--eval', '-o', str(tmp_path / 'c.png')]) == 2
    err = capsys.readouterr().err
    assert 'eval_curve.csv' in err and 'Traceback' not in err
    if text:                                                       # resuming reads it too
        with pytest.raises(ConfigError, match='eval_curve.csv'):
            train('fisor', TASK, seed=0, out=run, **kwargs)


@pytest.mark.parametrize('sampling', ['weighted-loss', 'weighted-sampling'])
def test_critics_first_trains_critics_then_the_actor_alone(dataset, tmp_path, sampling):
    overrides = {**TINY['fisor'], 'schedule': 'critics-first', 'critic_steps': 20,
                 'critic_check_every': 5, 'actor_sampling': sampling,
                 # lax settling rule: the second snapshot (iteration 10) already counts as settled
                 'settle_feasible_change': 2.0, 'settle_weight_rank': -2.0}
    kwargs = {'data': dataset, 'steps': 30, 'device': 'cpu', 'checkpoint_every': 5,
              'overrides': overrides, 'progress': False, 'preset': 'cpu'}
    runs = {}
    for stop in (5, 10, 15, 30):        # checkpoints in the critic phase, at and after the switch
        out = tmp_path / f'stop{stop}'
        train('fisor', TASK, seed=0, out=out, stop_after=stop, **kwargs)
        runs[stop] = _checkpoint(out)
    assert runs[10]['trainer']['actor_start'] == 10       # settled at the second snapshot
    assert runs[5]['trainer']['actor_start'] is None

    def params(state, prefix):
        return {k: v for k, v in state['model'].items() if k.startswith(prefix)}
    # critic phase: the actor does not move; actor phase: the critics are frozen
    for key, value in params(runs[5], 'actor.').items():
        assert torch.equal(value, runs[10]['model'][key]), key
    for prefix in ('q.', 'q_target.', 'v.'):
        before, after = params(runs[10], prefix), params(runs[30], prefix)
        assert before and all(torch.equal(v, after[k]) for k, v in before.items()), prefix
    assert any(not torch.equal(v, runs[30]['model'][k])
               for k, v in params(runs[10], 'actor.').items())
    for half in ('reward', 'feasibility'):     # both critics train in the critic phase
        rows = slice(0, 2) if half == 'reward' else slice(2, 4)     # the 'test' preset: 2 heads
        assert any(not torch.equal(v[rows], runs[10]['model'][k][rows])
                   for k, v in params(runs[5], 'q.').items()), half
    # a run resumed in the actor phase ends exactly where an uninterrupted one does
    resumed = tmp_path / 'resumed'
    train('fisor', TASK, seed=0, out=resumed, stop_after=15, **kwargs)
    train('fisor', TASK, seed=0, out=resumed, **kwargs)
    _assert_same_state(runs[30], _checkpoint(resumed))


def test_the_cpu_preset_trains_critics_first_for_a_share_of_any_step_count(dataset, tmp_path):
    from offline_training.algos import fisor
    assert fisor.make_config('paper').schedule == 'joint'
    for steps, cap in ((100_000, 40_000), (20_000, 8_000), (10, 4)):
        config = fisor.make_config('cpu', steps=steps)
        assert (config.schedule, config.actor_sampling) == ('critics-first', 'weighted-sampling')
        assert config.critic_phase_cap() == cap
    assert fisor.make_config('cpu', steps=10, critic_steps=3).critic_phase_cap() == 3
    # the preset as a user runs it (tiny networks only): 4 critic iterations, then the actor
    tiny = {k: v for k, v in TINY['fisor'].items() if k != 'schedule'}
    out = train('fisor', TASK, seed=0, out=tmp_path, data=dataset, steps=10, device='cpu',
                progress=False, preset='cpu', overrides=tiny)
    assert _checkpoint(out)['trainer']['actor_start'] == 4


def test_critics_first_needs_iterations_left_for_the_actor():
    from offline_training.algos import fisor
    with pytest.raises(ConfigError, match='critic_steps'):
        fisor.make_config('cpu', schedule='critics-first', steps=100, critic_steps=100)
    with pytest.raises(ConfigError, match='critic_fraction'):
        fisor.make_config('cpu', critic_fraction=1.0)
    with pytest.raises(ConfigError, match='schedule'):
        fisor.make_config('cpu', schedule='actor-first')
    with pytest.raises(ConfigError, match='critic_check_every'):
        fisor.make_config('cpu', critic_check_every=0)


def test_a_refused_config_or_dataset_leaves_no_run_folder(dataset, tmp_path):
    kwargs = {'device': 'cpu', 'progress': False, 'preset': 'cpu'}
    with pytest.raises(ConfigError, match='critic_steps'):
        train('fisor', TASK, seed=0, out=tmp_path / 'bad-config', data=dataset, steps=100,
              overrides={'schedule': 'critics-first', 'critic_steps': 100}, **kwargs)
    wrong_dims = {**dataset, 'observations': dataset['observations'][:, :3],
                  'next_observations': dataset['next_observations'][:, :3]}
    with pytest.raises(ConfigError, match='obs/act dims'):
        train('bc_all', TASK, seed=0, out=tmp_path / 'bad-data', data=wrong_dims, steps=2,
              **kwargs)
    assert not (tmp_path / 'bad-config').exists() and not (tmp_path / 'bad-data').exists()
    with pytest.raises(MissingFileError, match='not a checkpoint file'):   # a refused branch
        train('bc_all', TASK, seed=0, out=tmp_path / 'bad-branch', data=dataset, steps=2,
              init_from=tmp_path / 'no-such-run' / 'checkpoint.pt', **kwargs)
    assert not (tmp_path / 'bad-branch').exists()


def test_resume_accepts_a_run_made_before_a_config_field_existed(dataset, tmp_path):
    kwargs = {'data': dataset, 'steps': 4, 'device': 'cpu', 'progress': False, 'preset': 'cpu',
              'overrides': TINY['fisor']}
    out = train('fisor', TASK, seed=0, out=tmp_path / 'old', stop_after=2, **kwargs)
    config = yaml.safe_load((out / 'config.yaml').read_text())
    del config['algo_config']['schedule']           # as written before the field was added
    (out / 'config.yaml').write_text(yaml.safe_dump(config, sort_keys=False))
    train('fisor', TASK, seed=0, out=out, **kwargs)   # left at its default: resumes
    assert _checkpoint(out)['step'] == 4
    with pytest.raises(ConfigError, match='schedule'):  # set to something else: refused
        train('fisor', TASK, seed=0, out=out, **{**kwargs, 'steps': 8, 'overrides': {
            **TINY['fisor'], 'schedule': 'critics-first', 'critic_steps': 2}})


def test_resume_refuses_another_runs_checkpoint(dataset, tmp_path):
    kwargs = {'data': dataset, 'steps': 2, 'device': 'cpu', 'progress': False, 'preset': 'cpu'}
    train('bc_all', TASK, seed=0, out=tmp_path, overrides=TINY['bc_all'], **kwargs)
    with pytest.raises(ValueError, match='belongs to bc_all seed 0'):
        train('bc_all', TASK, seed=1, out=tmp_path, overrides=TINY['bc_all'], **kwargs)
    with pytest.raises(ValueError, match=r"different \['batch_size'\]"):
        train('bc_all', TASK, seed=0, out=tmp_path, overrides={'batch_size': 32}, **kwargs)


def test_resume_accepts_changed_inference_settings(dataset, tmp_path):
    kwargs = {'data': dataset, 'device': 'cpu', 'progress': False, 'preset': 'cpu'}
    train('fisor', TASK, seed=0, out=tmp_path, steps=2, overrides=TINY['fisor'], **kwargs)
    # The fallback's candidate count shapes the exported graph only: resuming with another one
    # continues the run (and records the new value) instead of refusing it.
    train('fisor', TASK, seed=0, out=tmp_path, steps=3,
          overrides={**TINY['fisor'], 'fallback_candidates': 4}, **kwargs)
    saved = yaml.safe_load(open(tmp_path / 'config.yaml'))
    assert saved['algo_config']['fallback_candidates'] == 4
    assert torch.load(tmp_path / 'checkpoint.pt', weights_only=False)['step'] == 3


def test_checkpoints_load_weights_only_and_a_pickle_payload_is_refused(
        ballcircle_arrays, tmp_path):
    run = train('fisor', TASK, preset='test', data=ballcircle_arrays, steps=2, out=tmp_path / 'r',
                progress=False, device='cpu')
    # What a checkpoint of the current code holds besides tensors and plain values is exactly
    # what the loader allows (numpy arrays of the RNG state), and it loads without pickle.
    allowed = {f'{g.__module__}.{g.__qualname__}' for g in CHECKPOINT_GLOBALS
               if not isinstance(g, tuple)}
    found = set(torch.serialization.get_unsafe_globals_in_checkpoint(run / 'checkpoint.pt'))
    assert found and found <= allowed, (found, allowed)
    state = load_checkpoint(run / 'checkpoint.pt', 'cpu', 'FIX')
    assert state['step'] == 2 and isinstance(state['rng']['numpy'][1], np.ndarray)
    assert open_run(run).run_config['checkpoint_step'] == 2
    train('fisor', TASK, preset='test', data=ballcircle_arrays, steps=3, out=run,
          progress=False, device='cpu')  # resume: the same loader
    assert _checkpoint(run)['step'] == 3
    # A checkpoint that names any other Python object is refused unread: nothing runs.
    marker = tmp_path / 'PWNED'

    class Payload:
        def __reduce__(self):
            return (os.system, (f'touch {marker}',))
    torch.save({'algorithm': 'fisor', 'seed': 0, 'step': 1, 'model': Payload(), 'trainer': {},
                'buffer': {}, 'rng': {}}, run / 'checkpoint.pt')
    for load in (lambda: load_checkpoint(run / 'checkpoint.pt', 'cpu', 'FIX'),
                 lambda: open_run(run),
                 lambda: train('fisor', TASK, preset='test', data=ballcircle_arrays, steps=4,
                               out=run, progress=False, device='cpu')):
        with pytest.raises(ConfigError, match=r'checkpoint.pt: refused: it names the Python '
                                              r'object (os|posix)\.system') as info:
            load()
        assert '\n' not in str(info.value)
    assert not marker.exists()


@pytest.fixture(scope='module')
def dataset_file(dataset, tmp_path_factory):
    path = tmp_path_factory.mktemp('data') / 'SafetyBallCircle-v0-test-10.hdf5'
    write_dataset(path, dataset, TASK)
    return path


def _set_args(algo):
    return [arg for key, value in TINY[algo].items()
            for arg in ('--set', f'{key}={list(value) if isinstance(value, tuple) else value}')]


def test_cli_writes_the_run_layout_and_load_run_rebuilds_the_model(dataset_file, tmp_path):
    out = tmp_path / 'run'
    code = main(['fisor', '--task', TASK, '--preset', 'cpu', '--seed', '0', '--dataset',
                 str(dataset_file), '--steps', '6', '--out', str(out), '--device', 'cpu',
                 '--log-every', '2', '--no-progress', *_set_args('fisor')])
    assert code == 0
    config = yaml.safe_load((out / 'config.yaml').read_text())
    assert config['algorithm'] == 'fisor' and config['task']['name'] == TASK
    assert config['dataset']['sha256'] and len(config['dataset']['sha256']) == 64
    assert config['algo_config']['actor_hidden'] == 64
    assert config['algo_config']['reward_scale'] == pytest.approx(
        200 / (get_task(TASK).max_reward - get_task(TASK).min_reward))
    assert list((out / 'tb').glob('events.out.tfevents.*'))
    assert yaml.safe_load((out / 'summary.yaml').read_text())['step'] == 6
    algo, loaded_config, model = load_run(out)
    assert algo == 'fisor' and loaded_config['checkpoint_step'] == 6
    obs = torch.zeros(2, 8)
    action = model.act(obs, model.sample_noise(2))
    assert action.shape == (2, 2) and not model.training
    assert main(['fisor', '--task', TASK, '--dataset', str(tmp_path / 'missing.hdf5'),
                 '--out', str(tmp_path / 'x'), '--no-progress']) == 2
    # The TensorBoard scalars read back (every 2 steps) and plot without a TensorBoard server.
    from offline_training import training_curves
    scalars = training_curves.read_scalars(out, ['value/feasible_fraction', 'loss/actor'])
    assert [step for step, _ in scalars['loss/actor']] == [2, 4, 6]
    assert all(0.0 <= v <= 1.0 for _, v in scalars['value/feasible_fraction'])
    png = tmp_path / 'curves.png'
    assert training_curves.main([str(out), '-o', str(png)]) == 0 and png.stat().st_size > 0
    assert training_curves.main([str(tmp_path / 'x'), '-o', str(png)]) == 2


def test_killed_process_resumes_at_its_checkpoint(dataset_file, tmp_path):
    out = tmp_path / 'run'
    args = ['bc_all', '--task', TASK, '--dataset', str(dataset_file), '--out', str(out),
            '--device', 'cpu', '--threads', '1', '--checkpoint-every', '50', '--no-progress',
            *_set_args('bc_all')]
    env = dict(os.environ, PYTHONWARNINGS='ignore')
    proc = subprocess.Popen([sys.executable, '-m', 'offline_training.train', *args,
                             '--steps', '100000000'], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (out / 'checkpoint.pt').exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    step = _checkpoint(out)['step']
    assert step >= 50 and step % 50 == 0
    assert main([*args, '--steps', str(step + 30)]) == 0
    summary = yaml.safe_load((out / 'summary.yaml').read_text())
    assert summary['step'] == step + 30 and summary['steps_this_session'] == 30
    # The summary names the malloc setting its speed figures were measured under.
    if platform.libc_ver()[0] == 'glibc':
        assert summary['allocator'].startswith('allocator: glibc keeps up to 256 MiB')
    # and whether its Adam steps ran in the compiled loops (one thread; mish too when an earlier
    # test in this process ran it: the summary covers the process)
    if native.library() is not None:
        assert re.match(r'(mish(, | and ))?Adam( and dropout)? in the compiled loops \(native '
                        r'kernels: ', summary['kernels'])
    else:
        assert summary['kernels'].startswith('mish, Adam and dropout in torch operators (native '
                                             'kernels: off')


ALLOCATION_PROBE = """
import ctypes, ctypes.util, resource, torch
from offline_training.algos import infrastructure as infra
def faults():
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        held = [torch.ones(768 * 1024) for _ in range(10)]   # ten 3 MiB blocks, as a step
        del held
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
before = infra.allocator_setting()
# glibc's default thresholds move with what the process freed before (imports), so some
# processes keep 30 MiB anyway: start every probe from the eager end of the default range.
mallopt = ctypes.CDLL(ctypes.util.find_library('c')).mallopt
assert mallopt(infra.M_MMAP_THRESHOLD, 128 * 1024) and mallopt(infra.M_TRIM_THRESHOLD, 128 * 1024)
faults()
eager = faults()
after = infra.keep_freed_memory()
faults()
print(eager, faults(), before, after, sep='|')
"""


@pytest.mark.skipif(platform.libc_ver()[0] != 'glibc', reason='mallopt is glibc only')
def test_kept_freed_memory_stops_the_page_faults_of_repeated_step_allocations():
    # A fresh interpreter: the setting is per process. With eager thresholds glibc returns the
    # freed 30 MiB to the kernel each round (the next round faults it back page by page), as
    # BCQ-Lag's steps did by default (bench/bench_allocator.py); kept, it does not.
    out = subprocess.run([sys.executable, '-c', ALLOCATION_PROBE], check=True,
                         capture_output=True, text=True).stdout.strip().split('|')
    eager, kept = int(out[0]), int(out[1])
    assert out[2] == 'allocator: default malloc settings'
    assert out[3].startswith('allocator: glibc keeps up to 256 MiB')
    assert eager > 10 * 7680 // 2, f'eager malloc faulted only {eager} pages'
    assert kept < eager // 20, f'{kept} page faults with freed memory kept vs {eager}'


def test_bcq_lag_trains_from_any_dataset_dict():
    data = synthetic_dataset(dims=(5, 3), episodes=10, max_length=50, fixed_length=True,
                             terminal_fraction=0)
    config = bcq_lag.make_config('cpu', steps=5, episode_len=50, **TINY['bcq_lag'])
    model = bcq_lag.train_bcq_lag(data, config, device='cpu', seed=0)
    assert not model.training
    action = model.act(torch.zeros(4, 5))
    assert action.shape == (4, 3) and action.abs().max() <= 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU (none visible)')
@pytest.mark.parametrize('algo, schedule', [
    ('fisor', {}), ('fisor', {'schedule': 'critics-first'}), ('bcq_lag', {})])
def test_cuda_training_and_resume(algo, schedule, tmp_path):
    # synthetic data: a GPU machine may have no simulator (tools/gpu_grid.py needs none)
    data = synthetic_dataset(TASK, episodes=10, seed=0, max_length=40)
    overrides = {**TINY[algo], **schedule, 'critic_check_every': 2} if schedule else TINY[algo]
    kwargs = {'data': data, 'steps': 10, 'device': 'cuda', 'checkpoint_every': 5,
              'overrides': overrides, 'progress': False, 'preset': 'cpu'}
    straight = train(algo, TASK, seed=0, out=tmp_path / 'straight', **kwargs)
    train(algo, TASK, seed=0, out=tmp_path / 'resumed', stop_after=5, **kwargs)
    resumed = train(algo, TASK, seed=0, out=tmp_path / 'resumed', **kwargs)
    assert yaml.safe_load((straight / 'config.yaml').read_text())['device'].startswith('cuda')
    # cuBLAS may pick different kernels between processes, so allow rounding differences.
    _assert_same_state(_checkpoint(straight), _checkpoint(resumed), exact=False)
    _, _, model = load_run(resumed)
    assert next(model.parameters()).device.type == 'cpu'
