"""The DSRL data layer: registry, round trip, validation of bad files, scores, CLI, plots."""

import json
import os
from pathlib import Path
import subprocess
import sys

import h5py
import numpy as np
from offline_training.data import cli
from offline_training.data import dataset as dataset_module
from offline_training.data.dataset import (DatasetError, DatasetNotFoundError, load_dataset,
                                           resolve_dataset_path, validate_file,
                                           write_dataset)
from offline_training.data.synthetic import synthetic_dataset
from offline_training.data.trajectories import (split_trajectories,
                                                trajectory_returns)
import pytest
from saferl_ros.files import sha256_file
from saferl_ros.tasks import get_task, normalized_score, TASK_NAMES, TASKS


def _write_raw(path, data, attrs=None):
    """Write arrays to HDF5 as they are, bypassing write_dataset's checks."""
    with h5py.File(path, 'w') as h5:
        for key, value in data.items():
            h5.create_dataset(key, data=value)
        for key, value in (attrs or {}).items():
            h5.attrs[key] = value
    return path


def _messages(problems):
    return [(p.key, p.message) for p in problems]


# ---------------------------------------------------------------- task registry


@pytest.mark.parametrize('name', TASK_NAMES)
def test_registry_matches_the_real_environments(name):
    spec = get_task(name)
    env = spec.make_env(offline=True)
    try:
        assert env.observation_space.shape == (spec.obs_dim,)
        assert env.action_space.shape == (spec.act_dim,)
        assert env.spec.max_episode_steps == spec.horizon
        offline = env.unwrapped
        assert offline.max_episode_reward == spec.max_reward
        assert offline.min_episode_reward == spec.min_reward
        assert offline.max_episode_cost == spec.max_cost
        assert env.unwrapped.dt == pytest.approx(spec.control_period, rel=1e-12)
    finally:
        env.close()
    # The registry writes dsrl's constants out (the runtime core must not need dsrl): every one
    # must be dsrl.infos' value to the last bit.
    from dsrl import infos
    assert spec.horizon == infos.DEFAULT_MAX_EPISODE_STEPS[name]
    assert (spec.max_reward, spec.min_reward) == (infos.MAX_EPISODE_REWARD[name],
                                                  infos.MIN_EPISODE_REWARD[name])
    assert (spec.max_cost, spec.min_cost) == (infos.MAX_EPISODE_COST[name],
                                              infos.MIN_EPISODE_COST[name])
    assert infos.DATASET_URLS[name].endswith('/' + spec.dsrl_file_name)


def test_task_lookup_accepts_every_spelling_and_rejects_unknown():
    assert get_task('OfflineCarRun-v0') is TASKS['CarRun']
    assert get_task('SafetyDroneCircle-v0') is TASKS['DroneCircle']
    assert get_task('ballrun').name == 'BallRun'
    assert TASKS['BallCircle'].dsrl_num_trajectories == 886
    with pytest.raises(KeyError, match='unknown task .*BallCircle'):
        get_task('PointGoal1')


# ---------------------------------------------------------------- round trip


def test_round_trip_write_validate_load_and_dsrl_loader(tmp_path, ballcircle_arrays):
    path = tmp_path / 'SafetyBallCircle-v0-80-6.hdf5'
    manifest = write_dataset(path, ballcircle_arrays, 'BallCircle', attrs={'seed': 3})
    assert validate_file(path) == []

    sidecar = json.loads(Path(str(path) + '.manifest.json').read_text())
    assert sidecar == manifest
    assert manifest['sha256'] == sha256_file(path)
    assert manifest['transitions'] == len(ballcircle_arrays['rewards'])
    assert manifest['trajectories'] == 6
    rewards, costs, _, _ = trajectory_returns(ballcircle_arrays)
    assert manifest['reward_return']['max'] == pytest.approx(rewards.max())
    assert manifest['cost_return']['mean'] == pytest.approx(costs.mean())

    loaded = load_dataset(path)
    for key, value in ballcircle_arrays.items():
        np.testing.assert_array_equal(loaded[key], np.asarray(value, dtype=np.float32))
        assert loaded[key].dtype == np.float32

    # dsrl's own loader accepts the file and sees the same data.
    env = get_task('BallCircle').make_env(offline=True)
    dsrl_data = env.unwrapped.get_dataset(str(path))
    env.close()
    np.testing.assert_array_equal(dsrl_data['observations'], loaded['observations'])
    np.testing.assert_array_equal(dsrl_data['costs'], loaded['costs'])
    np.testing.assert_array_equal(dsrl_data['timeouts'].astype(np.float32), loaded['timeouts'])


def test_write_refuses_bad_data_and_keeps_the_old_file(tmp_path, ballcircle_arrays):
    path = tmp_path / 'data.hdf5'
    write_dataset(path, ballcircle_arrays, 'BallCircle')
    before = sha256_file(path)
    bad = dict(ballcircle_arrays, rewards=ballcircle_arrays['rewards'].copy())
    bad['rewards'][3] = np.nan
    with pytest.raises(DatasetError, match='rewards: 1 transitions hold NaN'):
        write_dataset(path, bad, 'BallCircle')
    assert sha256_file(path) == before


def test_write_interrupted_midway_leaves_no_partial_file(tmp_path, ballcircle_arrays, monkeypatch):
    path = tmp_path / 'data.hdf5'
    write_dataset(path, ballcircle_arrays, 'BallCircle')
    before = sha256_file(path)

    calls = {'n': 0}
    real_create = h5py.Group.create_dataset

    def failing_create(self, name, *args, **kwargs):
        calls['n'] += 1
        if calls['n'] == 3:
            raise OSError('disk full (simulated)')
        return real_create(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, 'create_dataset', failing_create)
    with pytest.raises(OSError, match='disk full'):
        write_dataset(path, ballcircle_arrays, 'BallCircle')
    assert sha256_file(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ['data.hdf5', 'data.hdf5.manifest.json']


# ---------------------------------------------------------------- validation of bad files


def _bad_cases(arrays):
    """Yield (name, data, expected key, expected message fragment) for each kind of bad data."""
    n = len(arrays['rewards'])

    def changed(**kwargs):
        return {**arrays, **kwargs}

    missing = dict(arrays)
    del missing['costs']
    yield 'missing key', missing, 'costs', 'required key is missing'
    yield 'wrong obs width', changed(observations=arrays['observations'][:, :5]), \
        'observations', 'has 5 columns but BallCircle has a observation size of 8'
    nan_obs = arrays['next_observations'].copy()
    nan_obs[7, 2] = np.nan
    yield 'NaN', changed(next_observations=nan_obs), 'next_observations', 'hold NaN or Inf'
    inf_act = arrays['actions'].copy()
    inf_act[0, 0] = np.inf
    yield 'Inf', changed(actions=inf_act), 'actions', 'hold NaN or Inf (first at index 0)'
    # finite as float64, Inf once loaded as float32 (what training reads)
    huge = arrays['rewards'].astype(np.float64)
    huge[3] = 1e300
    yield 'beyond float32', changed(rewards=huge), 'rewards', 'hold NaN or Inf (first at index 3)'
    yield 'short column', changed(costs=arrays['costs'][:-1]), 'costs', \
        f'has {n - 1} rows but observations has {n}'
    yield 'bad flags', changed(terminals=np.full(n, 2.0)), 'terminals', 'must hold only 0/1'
    yield 'text dtype', changed(rewards=np.array(['x'] * n, dtype='S1')), 'rewards', \
        'must be floating point'
    yield 'action bounds', changed(actions=arrays['actions'] * 3), 'actions', \
        'outside the action space'
    yield 'negative cost', changed(costs=-np.ones(n, np.float32)), 'costs', 'negative costs'
    unended = changed(timeouts=np.zeros(n, bool), terminals=np.zeros(n, bool))
    yield 'cut off', unended, 'terminals', 'ends no episode'
    ends = arrays['timeouts'] | arrays['terminals']
    joined = ends.copy()
    joined[int(np.flatnonzero(ends)[0])] = False
    yield 'lost boundary', changed(timeouts=joined, terminals=np.zeros(n, bool)), 'timeouts', \
        'boundary is missing its terminal or timeout'


@pytest.mark.parametrize('case', range(11))
def test_validate_names_each_problem(tmp_path, ballcircle_arrays, case):
    name, data, key, fragment = list(_bad_cases(ballcircle_arrays))[case]
    path = _write_raw(tmp_path / 'bad.hdf5', data, attrs={'task': 'BallCircle'})
    problems = validate_file(path)
    assert problems, f'{name}: no problem reported'
    assert all(str(path) in str(p) for p in problems)
    assert any(p.key == key and fragment in p.message for p in problems), \
        f'{name}: expected {key}: {fragment!r}, got {_messages(problems)}'
    with pytest.raises(DatasetError):
        load_dataset(path)


def test_episode_longer_than_horizon_is_reported(tmp_path):
    data = synthetic_dataset('BallRun', episodes=1, seed=1, max_length=100)
    long = {k: np.concatenate([v, v]) for k, v in data.items()}
    # Join the two copies into one 2x-long episode with a continuous trajectory.
    n = len(data['rewards'])
    long['terminals'][n - 1] = long['timeouts'][n - 1] = False
    long['next_observations'][n - 1] = long['observations'][n]
    if n * 2 <= get_task('BallRun').horizon:
        pytest.fail('test data too short to exceed the horizon')
    problems = validate_file(_write_raw(tmp_path / 'SafetyBallRun-v0-x.hdf5', long))
    assert any('longer than the BallRun horizon of 100' in p.message for p in problems), \
        _messages(problems)


def test_unreadable_files_are_reported_not_raised(tmp_path, ballcircle_arrays):
    empty = tmp_path / 'empty.hdf5'
    empty.write_bytes(b'')
    assert 'file is empty' in validate_file(empty)[0].message

    text = tmp_path / 'notes.hdf5'
    text.write_text('observations,actions\n1,2\n')
    assert 'not an HDF5 file' in validate_file(text)[0].message

    good = tmp_path / 'good.hdf5'
    write_dataset(good, ballcircle_arrays, 'BallCircle')
    truncated = tmp_path / 'truncated.hdf5'
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    problems = validate_file(truncated)
    assert problems and any('truncated or corrupt' in p.message for p in problems), \
        _messages(problems)

    assert 'no such file' in validate_file(tmp_path / 'nope.hdf5')[0].message


def test_wrong_task_is_reported(tmp_path):
    run_data = synthetic_dataset('BallRun', episodes=3, seed=0, max_length=30)
    path = tmp_path / 'ballrun.hdf5'
    write_dataset(path, run_data, 'BallRun')
    assert validate_file(path) == []
    problems = validate_file(path, task='BallCircle')
    # the file's own task attribute wins over a --task naming another, also where the shapes
    # agree (CarRun is BallRun's shape): one robot's data are not trained as another's
    for other in ('BallCircle', 'CarRun'):
        problems = validate_file(path, task=other)
        assert [p.key for p in problems] == ['task'], _messages(problems)
        assert f'the file says task BallRun but {other} was given; pass --task BallRun' in \
            problems[0].message
    unknown = _write_raw(tmp_path / 'mystery.hdf5', run_data)
    assert any(p.key == 'task' and 'pass --task' in p.message for p in validate_file(unknown))
    # without a task attribute, --task says what the file is, and the shapes are checked
    problems = validate_file(unknown, task='BallCircle')
    assert any(p.key == 'observations' and 'has 7 columns but BallCircle' in p.message
               for p in problems), _messages(problems)


def test_missing_dataset_explains_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv('DSRL_DATASET_DIR', str(tmp_path))
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    monkeypatch.setattr(dataset_module, 'PROJECT_DATASET_DIR', tmp_path / 'project')
    with pytest.raises(DatasetNotFoundError) as err:
        resolve_dataset_path(task='CarRun')
    message = str(err.value)
    assert str(tmp_path) in message and 'saferl-data collect --task CarRun' in message
    assert 'SafetyCarRun-v0-40-651.hdf5' in message

    data = synthetic_dataset('CarRun', episodes=2, seed=0, max_length=20)
    write_dataset(tmp_path / 'SafetyCarRun-v0-40-2.hdf5', data, 'CarRun')
    assert resolve_dataset_path(task='OfflineCarRun-v0').name == 'SafetyCarRun-v0-40-2.hdf5'
    assert load_dataset(task='CarRun')['observations'].shape == data['observations'].shape
    # a newer dangling link and a folder of a dataset's name are passed over, not followed
    (tmp_path / 'SafetyCarRun-v0-40-9.hdf5').symlink_to(tmp_path / 'gone.hdf5')
    (tmp_path / 'SafetyCarRun-v0-40-8.hdf5').mkdir()
    assert resolve_dataset_path(task='CarRun').name == 'SafetyCarRun-v0-40-2.hdf5'
    with pytest.raises(DatasetNotFoundError, match='is a folder, not a regular file'):
        resolve_dataset_path(tmp_path / 'SafetyCarRun-v0-40-8.hdf5')


# ---------------------------------------------------------------- trajectories and scores


def test_split_trajectories_matches_a_plain_loop(ballcircle_arrays):
    trajectories = split_trajectories(ballcircle_arrays)
    ends = ballcircle_arrays['terminals'] | ballcircle_arrays['timeouts']
    start, expected = 0, []
    for t, end in enumerate(ends):
        if end:
            rewards = ballcircle_arrays['rewards'][start:t + 1].astype(np.float64)
            costs = ballcircle_arrays['costs'][start:t + 1]
            expected.append((start, t + 1, float(rewards.sum()), float(costs.sum())))
            start = t + 1
    assert [(tr.start, tr.stop) for tr in trajectories] == [e[:2] for e in expected]
    np.testing.assert_allclose([tr.reward_return for tr in trajectories],
                               [e[2] for e in expected], rtol=1e-12)
    np.testing.assert_allclose([tr.cost_return for tr in trajectories], [e[3] for e in expected])
    assert sum(tr.length for tr in trajectories) == len(ends)


@pytest.mark.parametrize('name', TASK_NAMES)
def test_normalized_score_equals_dsrl(name):
    env = get_task(name).make_env(offline=True)
    reference = env.unwrapped
    rng = np.random.default_rng(0)
    rewards = rng.uniform(-200, 2000, size=200)
    costs = np.concatenate([[0.0, 1.0], rng.uniform(0, 300, size=198)])
    for kappa in (0, 5, 10, 20, 40, 2.5):
        reference.set_target_cost(kappa)
        expected = np.array([reference.get_normalized_score(r, c) for r, c in zip(rewards, costs)])
        ours = np.array([normalized_score(name, r, c, kappa) for r, c in zip(rewards, costs)])
        np.testing.assert_allclose(ours, expected, rtol=0, atol=1e-9)
        vector_r, vector_c = normalized_score(name, rewards, costs, kappa)
        np.testing.assert_allclose(np.stack([vector_r, vector_c], 1), expected, rtol=0, atol=1e-9)
    env.close()
    # kappa = 0 uses eps = 1: a zero-cost episode scores exactly 1, not 0/0.
    assert normalized_score(name, 0.0, 0.0, 0)[1] == 1.0


# ---------------------------------------------------------------- CLI and plot


def test_cli_validate_exit_codes(tmp_path, ballcircle_arrays, capsys):
    good = tmp_path / 'good.hdf5'
    write_dataset(good, ballcircle_arrays, 'BallCircle')
    assert cli.main(['validate', str(good)]) == 0
    assert 'OK' in capsys.readouterr().out

    bad_data = dict(ballcircle_arrays)
    del bad_data['timeouts']
    bad = _write_raw(tmp_path / 'bad.hdf5', bad_data, attrs={'task': 'BallCircle'})
    assert cli.main(['validate', str(bad)]) == 1
    err = capsys.readouterr().err
    assert 'INVALID' in err and 'timeouts: required key is missing' in err


def test_installed_console_script_rejects_a_bad_file(tmp_path):
    bad = tmp_path / 'bad.hdf5'
    bad.write_bytes(b'\x00' * 64)
    script = Path(sys.executable).with_name('saferl-data')
    result = subprocess.run([str(script), 'validate', str(bad)], capture_output=True, text=True,
                            env={**os.environ, 'DSRL_SUPPRESS_IMPORT_ERROR': '1'}, timeout=120)
    assert result.returncode == 1
    assert 'not an HDF5 file' in result.stderr


def test_cli_info_and_plot(tmp_path, ballcircle_arrays, capsys):
    path = tmp_path / 'SafetyBallCircle-v0-80-6.hdf5'
    write_dataset(path, ballcircle_arrays, 'BallCircle')
    assert cli.main(['info', str(path)]) == 0
    out = capsys.readouterr().out
    assert 'trajectories 6' in out and 'DSRL dataset: 886' in out and 'cost return' in out

    png = tmp_path / 'plot.png'
    assert cli.main(['plot', str(path), '-o', str(png)]) == 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n' and png.stat().st_size > 10_000

    assert cli.main(['info', str(tmp_path / 'missing.hdf5')]) == 2
    assert 'no such file' in capsys.readouterr().err
