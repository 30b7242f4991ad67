"""OASIS: losses, guidance, the first-state pin, a tiny generator, the generated file, the CLI."""

from dataclasses import replace
import json
from pathlib import Path

import h5py
import numpy as np
from offline_training.algos import get_algorithm, oasis
from offline_training.algos.trajectory_diffusion import cfg_combine
from offline_training.data import cli
from offline_training.data.dataset import (check_file, COST_LABELS_ATTR, UNLABELLED, validate_file,
                                           write_dataset)
from offline_training.data.synthetic import synthetic_dataset
import pytest
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.errors import ConfigError
from saferl_ros.files import sha256_file
from saferl_ros.tasks import get_task
import torch

TASK = 'BallCircle'


def _toy(episodes=24, length=20, seed=0, obs_dim=8):
    """Two behaviours from the same starts: x falls (safe) or rises (a cost and more reward)."""
    rng = np.random.default_rng(seed)
    parts = {k: [] for k in DSRL_KEYS}
    for episode in range(episodes):
        up = episode % 2 == 0
        base = np.array([1.0, 0.5]) if up else np.array([-0.5, -0.25])
        actions = (base + 0.05 * rng.normal(size=(length, 2))).clip(-1, 1).astype(np.float32)
        states = np.zeros((length + 1, obs_dim), np.float32)
        states[0] = rng.uniform(-0.5, 0.5, size=obs_dim)
        states[1:] = states[0] + np.cumsum(0.1 * np.tile(actions, (1, obs_dim // 2)),
                                           axis=0)
        step = states[1:, 0] - states[:-1, 0]
        parts['observations'].append(states[:-1])
        parts['next_observations'].append(states[1:])
        parts['actions'].append(actions)
        parts['rewards'].append(10.0 * step)
        parts['costs'].append((step > 0).astype(np.float32))
        ends = np.zeros(length, bool)
        ends[-1] = True
        parts['terminals'].append(np.zeros(length, bool))
        parts['timeouts'].append(ends)
    return {k: np.concatenate(v) for k, v in parts.items()}


@pytest.fixture(scope='module')
def raw_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('oasis') / 'raw.hdf5'
    write_dataset(path, synthetic_dataset(TASK, episodes=10, seed=0, max_length=30), TASK)
    return path


@pytest.fixture(scope='module')
def reshaped(raw_file):
    out = raw_file.parent / 'gen.hdf5'
    assert cli.main(['reshape', str(raw_file), '--task', TASK, '-o', str(out), '--preset',
                     'test', '--no-progress', '--device', 'cpu']) == 0
    return out


# ------------------------------------------------------------------ losses and guidance

def test_losses_on_hand_made_inputs():
    class Difference(torch.nn.Module):
        def forward(self, obs, next_obs):
            return next_obs - obs

    windows = torch.tensor([[[0.0, 0.0], [1.0, 2.0], [1.0, 0.0]]])      # [1, 3, 2]
    actions = torch.tensor([[[1.0, 1.0], [0.0, -2.0]]])                 # [1, 2, 2]
    # f(s, s') = s' - s: errors (0, 1) and (0, 0) -> mean square 1 / 4.
    assert oasis.inverse_loss(Difference(), windows, actions).item() == pytest.approx(0.25)
    assert oasis.reward_label_loss(torch.tensor([1.0, 3.0]),
                                   torch.tensor([0.0, 1.0])).item() == pytest.approx(2.5)
    logits, target = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    bce = (np.log(2.0) + np.log(1 + np.exp(2.0))) / 2
    assert oasis.cost_label_loss(logits, target, True).item() == pytest.approx(bce, rel=1e-6)
    assert oasis.cost_label_loss(logits, target, False).item() == pytest.approx(2.5)


def test_generator_loss_is_half_the_sum_and_guidance_is_eq_8(monkeypatch):
    config = oasis.make_generator_config('test', inverse_hidden=4)
    model = oasis.OASISModel(3, 2, config)
    monkeypatch.setattr(model.diffusion, 'loss', lambda *args: torch.tensor(3.0))
    monkeypatch.setattr(oasis, 'inverse_loss', lambda inv, w, a: torch.tensor(1.0))
    total, denoise, inv = oasis.generator_loss(model, torch.zeros(2, 8, 3), torch.zeros(2, 7, 2),
                                               torch.zeros(2, 2))
    assert (total.item(), denoise.item(), inv.item()) == (2.0, 3.0, 1.0)
    # Eq. 8 with the paper default w = 2 on hand-made noise predictions.
    paper = oasis.make_generator_config('paper')
    assert (paper.guidance, paper.cond_dropout, paper.denoise_steps) == (2.0, 0.1, 20)
    out = cfg_combine(torch.tensor([1.0, 0.0]), torch.tensor([2.0, -1.0]), paper.guidance)
    assert torch.equal(out, torch.tensor([3.0, -2.0]))
    resolved = oasis.resolve_generator_config(paper, get_task('DroneRun'))
    assert (resolved.steps, resolved.inverse_hidden) == (600_000, 128)
    assert resolved.conditions == ((275.0, 10.0), (275.0, 15.0), (300.0, 20.0))
    halved = oasis.resolve_generator_config(oasis.make_generator_config('paper', kappa=10.0),
                                            get_task(TASK))
    assert [c for _, c in halved.conditions] == [5.0, 7.5, 10.0]


def test_condition_and_window_sampler():
    data = _toy(episodes=4, length=10)
    sampler = oasis.WindowSampler(data, horizon=5, offset=70.0)
    rng = np.random.default_rng(0)
    windows, actions, cond = sampler.sample(16, rng)
    assert windows.shape == (16, 5, 8) and actions.shape == (16, 4, 2) and cond.shape == (16, 2)
    # Consecutive states inside a window follow the toy dynamics s' = s + 0.1 [a, a, a, a].
    step = windows[:, 1:] - windows[:, :-1]
    assert np.allclose(step[..., 0], 0.1 * actions[..., 0], atol=1e-5)
    # y = [C / C_max, R / R_max] of the source trajectory.
    assert cond[:, 0].max() <= 1.0 and np.isclose(sampler.cost_max, sampler.cost_returns.max())
    with pytest.raises(ValueError, match='lower the OASIS horizon'):
        oasis.WindowSampler(data, horizon=12)


def test_start_states_from_the_data_or_the_training_windows():
    # Half the toy's trajectories (the rising ones) cost 1 per step. With a weight offset below
    # their cost return the training windows never come from them, nor do 'training' starts.
    data = _toy(episodes=8, length=10)
    returns = oasis.trajectory_returns(data)[1]
    rising = {tuple(s) for s, c in zip(data['observations'], np.repeat(returns, 10)) if c > 5}
    config = oasis.make_generator_config('test', horizon=5, num_starts=400,
                                         cost_sample_offset=5.0)
    assert config.start_states == 'data'   # the official code's choice is the default
    from_data = oasis.start_states(data, config, np.random.default_rng(0))
    assert from_data.shape == (400, 8) and from_data.dtype == np.float32
    assert 0.3 < np.mean([tuple(s) in rising for s in from_data]) < 0.7
    training = oasis.start_states(data, replace(config, start_states='training'),
                                  np.random.default_rng(0))
    assert training.shape == (400, 8) and not any(tuple(s) in rising for s in training)
    # each can begin a full window: of a trajectory's 11 states, one of the first 11 - 5 + 1
    firsts = {tuple(s) for e in range(8) for s in data['observations'][e * 10:e * 10 + 7]}
    assert all(tuple(s) in firsts for s in training)
    with pytest.raises(ValueError, match='start_states must be one of data, training'):
        oasis.make_generator_config('test', start_states='anywhere')


# ------------------------------------------------------------------ a tiny generator

@pytest.fixture(scope='module')
def toy_model():
    # One thread: the tiny model's outcome shifts with the reduction order of more threads
    # (seen on a 2-thread run: the unsafe condition's drift 0.16 instead of 0.10). 1400 steps:
    # at 700 the unsafe drift ranged 0.08-0.18 over seeds 0-2 and mish's two float paths
    # (torch's operators, the compiled loops), at 1400 0.086-0.115.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = _toy(obs_dim=2)
    config = oasis.resolve_generator_config(oasis.make_generator_config(
        'test', steps=1400, denoise_steps=20, hidden=64, num_blocks=2, batch_size=64, lr=2e-3,
        ema_start=10**6, label_steps=400, label_hidden=(64, 64), cost_sample_offset=None,
        num_starts=64, holdout_fraction=0.25), get_task(TASK))
    try:
        model, info = oasis.fit(data, config, seed=0)
    finally:
        torch.set_num_threads(threads)
    return data, config, model, info


def test_tiny_generator_reproduces_its_conditioned_returns(toy_model):
    data, config, model, info = toy_model
    # Rewards are a_x (about +1 or -0.5, noise 0.05); costs are 1 when x rises.
    assert info['labels']['reward_mae'] < 0.1
    assert info['labels']['cost_accuracy'] > 0.9
    rewards, costs, _, _ = oasis.trajectory_returns(data)
    safe = (float(rewards[costs == 0].mean()), 0.0)
    unsafe = (float(rewards[costs > 0].mean()), float(costs.max()))
    arrays, summary = oasis.generate(model, data, config, [safe, unsafe], seed=0)
    transitions = config.keep_states - 1
    drift = (arrays['next_observations'][:, 0] - arrays['observations'][:, 0]).reshape(
        2, config.num_starts, transitions)
    # The unsafe condition reproduces its behaviour's dynamics (x rises by 0.1 per step), the
    # safe one moves x far less (its behaviour: -0.05 per step) and less than the unconditioned
    # mixture of both (+0.025), which a generator that ignored its condition would give both.
    # The margins allow other CPUs' float paths: the unsafe drift read 0.086-0.115 on an Intel
    # Xeon (seeds 0-2, both mish paths); on an AMD EPYC (Zen 4) safe 0.009, unsafe 0.086.
    assert abs(drift[1].mean() - 0.1) < 0.07 and (drift[1].mean(axis=1) > 0).mean() > 0.85
    assert drift[0].mean() < 0.025 and drift[0].mean() < drift[1].mean() - 0.06
    # ... and the labelled returns follow: more reward and cost under the unsafe condition.
    low, high = summary
    assert high['cost_per_step'] > low['cost_per_step'] + 0.2
    assert high['reward_per_step'] > low['reward_per_step'] + 0.3
    # Inverse dynamics give the behaviour asked for larger actions along x.
    actions = arrays['actions'].reshape(2, config.num_starts, transitions, 2)
    assert actions[0, ..., 0].mean() < actions[1, ..., 0].mean() - 0.3


def test_first_state_pin_holds_in_generation(toy_model):
    data, config, model, _ = toy_model
    arrays, _ = oasis.generate(model, data, replace_config(config, num_starts=16),
                               [(1.0, 0.0)], seed=3)
    firsts = arrays['observations'].reshape(16, config.keep_states - 1, -1)[:, 0]
    rng = np.random.default_rng(3 + 3)
    starts = data['observations'][rng.integers(len(data['observations']), size=16)]
    assert np.allclose(firsts, starts, atol=1e-5)      # exact up to (x - mean) / std round trip
    free, _ = oasis.generate(model, data, replace_config(config, num_starts=16,
                                                         pin_first_state=False),
                             [(1.0, 0.0)], seed=3)
    assert not np.allclose(free['observations'].reshape(16, config.keep_states - 1, -1)[:, 0],
                           starts, atol=1e-3)


def replace_config(config, **changes):
    from dataclasses import replace
    return replace(config, **changes)


# ------------------------------------------------------------------ the generated file

def test_reshape_writes_its_report_and_the_asked_against_made_plot(reshaped):
    report = json.loads(Path(str(reshaped) + '.report.json').read_text())
    config = oasis.make_generator_config('test')
    assert len(report['conditions']) == 3
    assert all(row['windows'] == config.num_starts for row in report['conditions'])
    assert report['generated_transitions'] == 3 * config.num_starts * (config.keep_states - 1)
    assert 'reward_mae' in report['fit']['labels']
    png = Path(str(reshaped) + '.conditions.png')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_generated_file_validates_and_loads_with_dsrl(reshaped):
    import dsrl  # noqa: F401  (registers the Offline*-v0 ids)
    import gymnasium as gym

    spec = get_task(TASK)
    assert validate_file(reshaped, task=TASK) == []
    data = gym.make(spec.offline_id).unwrapped.get_dataset(str(reshaped))   # dsrl's own loader
    config = oasis.make_generator_config('test')
    per_window = config.keep_states - 1
    assert data['observations'].shape == (3 * config.num_starts * per_window, spec.obs_dim)
    assert data['timeouts'].sum() == 3 * config.num_starts and not data['terminals'].any()
    assert np.abs(data['actions']).max() <= 1.0


def test_generated_file_is_marked_for_every_tool(reshaped, raw_file, capsys):
    config = oasis.make_generator_config('test')
    report = check_file(reshaped)
    assert report.generated['generator'] == 'oasis' and report.generated['mode'] == 'replace'
    assert report.generated['source_sha256'] == sha256_file(raw_file)
    assert [c['cost'] for c in report.generated['conditions']] == [10.0, 15.0, 20.0]
    assert report.generated['model']['config']['horizon'] == config.horizon
    assert any(n.key == 'generated' for n in report.notes)
    assert cli.main(['info', str(reshaped)]) == 0
    assert 'origin       GENERATED by oasis' in capsys.readouterr().out
    assert cli.main(['validate', str(reshaped)]) == 0
    assert 'GENERATED' in capsys.readouterr().out
    manifest = json.loads(Path(str(reshaped) + '.manifest.json').read_text())
    assert manifest['attrs']['generated'] is True


def test_training_on_generated_data_says_so_and_oasis_refuses_raw(reshaped, raw_file, tmp_path,
                                                                  capsys):
    from offline_training.train import main as train_main
    import yaml

    module, _ = get_algorithm('oasis')
    assert module.REQUIRES_GENERATED
    assert train_main(['oasis', '--task', TASK, '--dataset', str(raw_file), '--preset', 'test',
                       '--steps', '2', '--out', str(tmp_path / 'r'), '--device', 'cpu',
                       '--no-progress']) == 2
    assert 'run `saferl-data reshape' in capsys.readouterr().err
    assert train_main(['oasis', '--task', TASK, '--dataset', str(reshaped), '--preset', 'test',
                       '--steps', '2', '--out', str(tmp_path / 'g'), '--device', 'cpu',
                       '--no-progress']) == 0
    assert 'GENERATED by oasis' in capsys.readouterr().err
    run = yaml.safe_load((tmp_path / 'g' / 'config.yaml').read_text())
    text = json.dumps(run, default=str)
    assert '"source": "generated"' in text and '"generator": "oasis"' in text


def test_reshape_reuses_its_generator_and_mixes(reshaped, raw_file, capsys):
    out = raw_file.parent / 'mix.hdf5'
    assert cli.main(['reshape', str(raw_file), '--task', TASK, '-o', str(out), '--preset', 'test',
                     '--generator', str(reshaped) + '.generator.pt', '--mode', 'mix',
                     '--condition', '100,5', '--no-progress', '--device', 'cpu']) == 0
    assert 'generator    loaded' in capsys.readouterr().out
    # generation settings come from the command, also for a loaded generator
    other = raw_file.parent / 'starts.hdf5'
    assert cli.main(['reshape', str(raw_file), '--task', TASK, '-o', str(other), '--preset',
                     'test', '--generator', str(reshaped) + '.generator.pt', '--start-states',
                     'training', '--no-progress', '--device', 'cpu']) == 0
    with h5py.File(other, 'r') as h5:
        assert json.loads(h5.attrs['model'])['config']['start_states'] == 'training'
    with h5py.File(out, 'r') as h5, h5py.File(raw_file, 'r') as raw:
        generated = oasis.make_generator_config('test').num_starts * 4
        assert h5['observations'].shape[0] == raw['observations'].shape[0] + generated
        assert h5.attrs['mode'] == 'mix' and h5.attrs['generated']
    assert validate_file(out, task=TASK) == []


def test_reshape_bad_inputs_fail_in_one_line(raw_file, reshaped, tmp_path, capsys):
    base = ['--task', TASK, '--preset', 'test', '--no-progress', '--device', 'cpu']

    def error(args):
        assert cli.main(['reshape', *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        # One line per problem (a wrong task's file has two: both observation keys).
        assert 1 <= len(err) <= 2 and all(e.startswith('saferl-data: error: ') for e in err)
        return err[0]

    assert 'no such file' in error([str(tmp_path / 'none.hdf5'), '-o', str(tmp_path / 'a'),
                                    *base])
    assert "unknown task 'Nope'" in error([str(raw_file), '-o', str(tmp_path / 'a'),
                                           '--task', 'Nope', '--preset', 'test'])
    assert 'the file says task BallCircle but CarRun was given' in error(
        [str(raw_file), '-o', str(tmp_path / 'a'), '--task', 'CarRun', '--preset', 'test'])
    assert '--kappa must be > 0' in error([str(raw_file), '-o', str(tmp_path / 'a'), *base,
                                           '--kappa', '0'])
    assert 'already exists' in error([str(raw_file), '-o', str(reshaped), *base])
    assert 'is generated data' in error([str(reshaped), '-o', str(tmp_path / 'a'), *base])
    assert 'above kappa' in error([str(raw_file), '-o', str(tmp_path / 'a'), *base,
                                   '--condition', '100,30', '--generator',
                                   str(reshaped) + '.generator.pt'])
    assert 'not a saferl_ros recording' in error([str(tmp_path), '-o', str(tmp_path / 'a'),
                                                  *base])
    assert 'start_states must be one of data, training' in error(
        [str(raw_file), '-o', str(tmp_path / 'a'), *base, '--start-states', 'anywhere'])
    assert 'unknown OASIS preset' in error([str(raw_file), '-o', str(tmp_path / 'a'),
                                            '--task', TASK, '--preset', 'huge'])
    junk = tmp_path / 'junk.pt'
    junk.write_bytes(b'not torch')
    assert 'not a readable OASIS generator' in error([str(raw_file), '-o', str(tmp_path / 'a'),
                                                      *base, '--generator', str(junk)])
    other = tmp_path / 'other.hdf5'
    write_dataset(other, synthetic_dataset(TASK, episodes=10, seed=1, max_length=30), TASK)
    assert 'remove it (or give another --generator)' in error(
        [str(other), '-o', str(tmp_path / 'a'), *base, '--generator',
         str(reshaped) + '.generator.pt'])
    # a cost-free split (DSPO's unlabelled set) has no labels to learn the cost from
    cost_free = synthetic_dataset(TASK, episodes=10, seed=2, max_length=30)
    cost_free['costs'] = np.full(len(cost_free['costs']), np.nan, np.float32)
    write_dataset(tmp_path / 'cost-free.hdf5', cost_free, TASK,
                  attrs={COST_LABELS_ATTR: UNLABELLED})
    assert 'no cost labels' in error([str(tmp_path / 'cost-free.hdf5'), '-o',
                                      str(tmp_path / 'a'), *base])
    assert not (tmp_path / 'a').exists()
    with pytest.raises(SystemExit):
        cli.main(['reshape', str(raw_file), '-o', str(tmp_path / 'a'), *base,
                  '--condition', 'ten'])


def test_generator_training_resumes_where_it_was_killed(tmp_path, monkeypatch):
    # An interrupted reshape (Ctrl-C, a lost machine) resumes its generator from the state kept
    # every few steps: the same parameters as a run that was never interrupted.
    data = _toy(episodes=8, length=12, obs_dim=2)
    config = oasis.resolve_generator_config(oasis.make_generator_config(
        'test', steps=30, ema_start=10), get_task(TASK))
    sampler = oasis.WindowSampler(data, config.horizon, config.cost_sample_offset)

    def train(checkpoint, identity=None, seed=0, config=config):
        torch.manual_seed(seed)
        model = oasis.OASISModel(2, 2, config)
        logs = oasis.train_generator(model, sampler, config, seed=seed, checkpoint=checkpoint,
                                     identity=identity or {'data': 'toy'}, checkpoint_every=10)
        return model, logs

    straight, _ = train(None)
    checkpoint = tmp_path / 'gen.partial'
    calls = {'n': 0}
    real_loss = oasis.generator_loss

    def dies_at_step_25(*args, **kwargs):
        calls['n'] += 1
        if calls['n'] == 25:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(oasis, 'generator_loss', dies_at_step_25)
    with pytest.raises(KeyboardInterrupt):
        train(checkpoint)
    monkeypatch.setattr(oasis, 'generator_loss', real_loss)
    assert torch.load(checkpoint, weights_only=False)['step'] == 20
    resumed, logs = train(checkpoint)
    assert logs['resumed_at'] == 20 and 0 < logs['cpu_s']
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    # another run's state is refused, with the field that differs, not silently resumed
    with pytest.raises(ConfigError, match=r"config fields \['lr'\] differ"):
        train(checkpoint, config=replace(config, lr=0.5))
    with pytest.raises(ConfigError, match='seed differ'):
        train(checkpoint, seed=1)
    with pytest.raises(ConfigError, match='source data differ'):
        train(checkpoint, identity={'data': 'other'})
    # generation settings may change (the same generator serves another kappa)
    assert train(checkpoint, config=replace(config, kappa=10.0, num_starts=7))[1]['resumed_at']
    checkpoint.write_bytes(b'junk')
    with pytest.raises(ConfigError, match='not a readable checkpoint .*; remove it to train the '
                                          'generator from the start'):
        train(checkpoint)


def test_reshape_resumes_an_interrupted_generator_and_removes_its_state(
        raw_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'gen.hdf5'
    args = ['reshape', str(raw_file), '--task', TASK, '-o', str(out), '--preset', 'test',
            '--no-progress', '--device', 'cpu', '--set', 'steps=30']
    monkeypatch.setattr(oasis, 'GENERATOR_CHECKPOINT_EVERY', 10)
    real_fit = oasis.fit

    def fit_then_killed(*args, **kwargs):
        real_fit(*args, **kwargs)       # the state was kept at steps 10 and 20
        raise KeyboardInterrupt

    monkeypatch.setattr(oasis, 'fit', fit_then_killed)
    with pytest.raises(KeyboardInterrupt):
        cli.main(args)
    partial = Path(str(out) + '.generator.pt.partial')
    assert partial.is_file() and not out.exists()
    monkeypatch.setattr(oasis, 'fit', real_fit)
    assert cli.main(args) == 0
    assert f'resuming from {partial}' in capsys.readouterr().out
    assert not partial.exists() and out.is_file()
    record = torch.load(str(out) + '.generator.pt', weights_only=True)
    assert record['info']['generator']['resumed_at'] == 20


def test_tempting_variant_drops_most_low_cost_trajectories(tmp_path, capsys):
    data = _toy(episodes=40, length=20)
    source = tmp_path / 'raw.hdf5'
    write_dataset(source, data, TASK)
    out = tmp_path / 'tempting.hdf5'
    assert cli.main(['tempting', str(source), '--task', TASK, '-o', str(out), '--cost-max', '0',
                     '--seed', '1']) == 0
    rewards, costs, _, _ = oasis.trajectory_returns(data)
    kept_r, kept_c, _, _ = oasis.trajectory_returns(check_and_load(out))
    assert (kept_c > 0).sum() == (costs > 0).sum() == 20          # unsafe ones all kept
    assert (kept_c == 0).sum() <= 6                                 # ~90 % of 20 safe removed
    with h5py.File(out, 'r') as h5:
        assert 'generated' not in h5.attrs and 'tempting_from_sha256' in h5.attrs
    assert cli.main(['tempting', str(source), '--task', TASK, '-o', str(tmp_path / 'x.hdf5'),
                     '--remove-ratio', '2']) == 2
    # NaN compares false with every cost return: it removed nothing and wrote a copy
    assert cli.main(['tempting', str(source), '--task', TASK, '-o', str(tmp_path / 'x.hdf5'),
                     '--cost-min', 'nan']) == 2
    assert '--cost-min must be a finite number' in capsys.readouterr().err
    assert not (tmp_path / 'x.hdf5').exists()


def check_and_load(path):
    from offline_training.data.dataset import load_dataset
    return load_dataset(path, task=TASK)


def test_subset_keeps_whole_trajectories_and_the_marks_of_its_source(reshaped, raw_file,
                                                                     tmp_path, capsys):
    # OASIS's data-efficiency check trains on a small share of generated or raw data.
    import h5py
    from offline_training.data.dataset import file_generated_info, is_unlabelled

    small = tmp_path / 'gen-small.hdf5'
    assert cli.main(['subset', str(reshaped), '--task', TASK, '--transitions', '50',
                     '-o', str(small)]) == 0
    window = oasis.make_generator_config('test').keep_states - 1
    with h5py.File(small, 'r') as h5:
        n = h5['observations'].shape[0]
        ends = np.asarray(h5['timeouts']) | np.asarray(h5['terminals'])
    assert 50 <= n < 50 + window and n % window == 0 and ends[-1]
    assert file_generated_info(small)['source_sha256'] == \
        file_generated_info(reshaped)['source_sha256']          # still generated data
    assert validate_file(small, task=TASK) == []
    # the same seed draws the same trajectories; another seed others
    again, other = tmp_path / 'again.hdf5', tmp_path / 'other.hdf5'
    assert cli.main(['subset', str(reshaped), '--task', TASK, '--transitions', '50',
                     '-o', str(again)]) == 0
    assert cli.main(['subset', str(reshaped), '--task', TASK, '--transitions', '50',
                     '--seed', '1', '-o', str(other)]) == 0
    with h5py.File(small, 'r') as a, h5py.File(again, 'r') as b, h5py.File(other, 'r') as c:
        assert np.array_equal(a['observations'][:], b['observations'][:])
        assert not np.array_equal(a['observations'][:], c['observations'][:])
    # collected data stays collected; a cost-free file stays cost-free
    half = tmp_path / 'half.hdf5'
    assert cli.main(['subset', str(raw_file), '--task', TASK, '--fraction', '0.5',
                     '-o', str(half)]) == 0
    assert file_generated_info(half) is None
    cost_free = synthetic_dataset(TASK, episodes=10, seed=2, max_length=30)
    cost_free['costs'] = np.full(len(cost_free['costs']), np.nan, np.float32)
    write_dataset(tmp_path / 'cost-free.hdf5', cost_free, TASK,
                  attrs={COST_LABELS_ATTR: UNLABELLED})
    assert cli.main(['subset', str(tmp_path / 'cost-free.hdf5'), '--task', TASK, '--fraction',
                     '0.3', '-o', str(tmp_path / 'cf.hdf5')]) == 0
    with h5py.File(tmp_path / 'cf.hdf5', 'r') as h5:
        assert is_unlabelled(h5.attrs) and np.isnan(h5['costs'][:]).all()
    capsys.readouterr()
    # bad inputs: one line each, nothing written
    for args, message in (([], 'exactly one of --fraction and --transitions'),
                          (['--fraction', '0.5', '--transitions', '5'], 'exactly one'),
                          (['--fraction', '0'], '--fraction must lie in (0, 1]'),
                          (['--transitions', '0'], '--transitions must be >= 1'),
                          (['--transitions', '10000000'], 'is more than')):
        assert cli.main(['subset', str(raw_file), '--task', TASK, *args,
                         '-o', str(tmp_path / 'bad.hdf5')]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / 'bad.hdf5').exists()
    assert cli.main(['subset', str(raw_file), '--task', TASK, '--fraction', '0.5',
                     '-o', str(half)]) == 2
    assert 'already exists' in capsys.readouterr().err


def test_reshape_reads_a_recorder_run_folder(raw_file, tmp_path, capsys):
    from saferl_ros.recorder import RecordingWriter, Step

    data = synthetic_dataset(TASK, episodes=4, seed=2, max_length=20, fixed_length=True)
    run = tmp_path / 'run_0'
    writer = RecordingWriter(run, TASK, 8, 2)
    for t in range(len(data['rewards'])):
        writer.add(Step(data['observations'][t], data['actions'][t], float(data['rewards'][t]),
                        float(data['costs'][t]), data['next_observations'][t]))
        if data['terminals'][t] or data['timeouts'][t]:
            writer.end_episode(terminal=bool(data['terminals'][t]),
                               timeout=bool(data['timeouts'][t]))
    writer.close(consolidate_run=False)
    out = tmp_path / 'from_run.hdf5'
    assert cli.main(['reshape', str(run), '--task', TASK, '-o', str(out), '--preset', 'test',
                     '--no-progress', '--device', 'cpu']) == 0
    assert '(recording, 80 transitions' in capsys.readouterr().out
    report = check_file(out)
    assert report.problems == [] and report.generated['source'] == str(run)
    assert report.generated['source_sha256'] == oasis.arrays_sha256(data)


def test_merge_keeps_the_generated_mark(reshaped, raw_file, tmp_path):
    out = tmp_path / 'merged.hdf5'
    assert cli.main(['merge', '--dataset', str(reshaped), '--task', TASK, '-o', str(out)]) == 0
    report = check_file(out)
    assert report.problems == [] and report.generated['mode'] == 'mix'
    assert str(reshaped) in report.generated['generator']
    plain = tmp_path / 'plain.hdf5'
    assert cli.main(['merge', '--dataset', str(raw_file), '--task', TASK, '-o', str(plain)]) == 0
    assert check_file(plain).generated is None


def test_start_state_tool_generates_from_each_set(reshaped, raw_file, tmp_path, capsys):
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        'oasis_start_states', Path(__file__).parents[1] / 'tools' / 'oasis_start_states.py')
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out = tmp_path / 'starts.json'
    assert tool.main([str(reshaped) + '.generator.pt', str(raw_file), '--task', TASK,
                      '--starts', '8', '-o', str(out)]) == 0
    report = json.loads(out.read_text())
    printed = capsys.readouterr().out
    horizon = get_task(TASK).horizon
    assert report['starts'] == 8 and len(report['conditions']) == 3
    for name in ('data', 'training', 'cost-free steps', 'episode starts'):
        row = report['rows'][name]
        assert name in printed and len(row['cost']) == len(row['reward']) == 3
        assert all(0.0 <= c <= horizon for c in row['cost'])
        assert all(np.isfinite(r) for r in row['reward'])
