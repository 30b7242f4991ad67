"""
Tests of the dataset-collection pipeline: behaviour agents, rollouts, density filter, output.

Real PyBullet environments and real PPO updates, kept tiny: a few short episodes per task and a
few hundred training steps, so the whole file runs in well under a minute and a half on 2 cores.
"""

import hashlib
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import numpy as np
from offline_training.collection.behavior import (BehaviorConfig, list_checkpoints,
                                                  make_training_envs, NumpyActor, PenaltyState,
                                                  read_state, save_actor, train_behavior)
from offline_training.collection.collect import (allocation_weights, collect_pool, collect_task,
                                                 CollectConfig, dataset_file_name)
from offline_training.collection.density import DensityFilterConfig, grid_filter
from offline_training.collection.lagrangian import BudgetSchedule, PIDLagrangian
from offline_training.data.dataset import load_dataset, validate_file
from offline_training.data.trajectories import trajectory_returns
import pytest
from saferl_ros.tasks import get_task

SIX_TASKS = ('BallCircle', 'CarCircle', 'DroneCircle', 'BallRun', 'CarRun', 'DroneRun')
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    import torch
    torch.set_num_threads(1)


def _random_actors(folder: Path, task: str, count: int = 2, seed: int = 0):
    """Write ``count`` random 64x64 tanh actors in the trainer's checkpoint format."""
    spec = get_task(task)
    rng = np.random.default_rng(seed)
    ckpt_dir = folder / 'checkpoints'
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    sizes = [spec.obs_dim, 64, 64, spec.act_dim]
    for k in range(count):
        arrays = {'log_std': np.full(spec.act_dim, -0.5, dtype=np.float32)}
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            arrays[f'W{i}'] = rng.normal(0, 1.0 / np.sqrt(n_in), (n_out, n_in)).astype(np.float32)
            arrays[f'b{i}'] = rng.normal(0, 0.1, n_out).astype(np.float32)
        save_actor(ckpt_dir / f'step_{k:09d}.npz', arrays, {'task': spec.name, 'steps': k})
    return folder


# ------------------------------------------------------------------ collection, six real tasks

@pytest.mark.parametrize('task', SIX_TASKS)
def test_collect_writes_a_valid_dsrl_dataset(task, tmp_path):
    import dsrl  # noqa: F401  (registers the Offline*-v0 ids)
    import gymnasium as gym

    spec = get_task(task)
    agents = _random_actors(tmp_path / 'agents', task)
    path = collect_task(task, agent_dir=agents, out_dir=tmp_path, seed=3, progress=False,
                        episodes_per_setting=1, action_noise=(0.0, 0.3), max_steps=25,
                        cmax=1e9, max_per_bin=10)
    assert path.name.startswith(f'{spec.env_id}-1e+09-')
    assert validate_file(path, task=task) == []
    data = gym.make(spec.offline_id).unwrapped.get_dataset(str(path))  # dsrl's own loader
    assert data['observations'].shape[1:] == (spec.obs_dim,)
    assert data['actions'].shape[1:] == (spec.act_dim,)
    assert np.abs(data['actions']).max() <= 1.0  # clipped to the action space
    rewards, costs, starts, stops = trajectory_returns(data)
    assert starts.size == 4  # 2 checkpoints x 2 noise levels x 1 episode, all kept
    assert ((stops - starts) <= 25).all()
    ends = data['terminals'].astype(bool) | data['timeouts'].astype(bool)
    assert ends.sum() == 4 and ends[-1]
    manifest = json.loads(Path(str(path) + '.manifest.json').read_text())
    assert manifest['trajectories'] == 4
    assert manifest['sha256'] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_collection_is_deterministic_for_a_seed(tmp_path):
    agents = _random_actors(tmp_path / 'agents', 'BallRun')
    config = CollectConfig(task='BallRun', seed=7, episodes_per_setting=2, max_steps=30,
                           action_noise=(0.0, 0.5))
    first, _ = collect_pool(config, list_checkpoints(agents), progress=False)
    np.random.seed(123)  # global rng state must not matter
    again, _ = collect_pool(config, list_checkpoints(agents), progress=False)
    other, _ = collect_pool(CollectConfig(**{**config.__dict__, 'seed': 8}),
                            list_checkpoints(agents), progress=False)
    for a, b in zip(first, again):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert any(not np.array_equal(a['observations'], b['observations'])
               for a, b in zip(first, other))


def test_collecting_twice_gives_the_same_bytes(tmp_path):
    agents = _random_actors(tmp_path / 'agents', 'BallRun')
    kwargs = {'agent_dir': agents, 'seed': 5, 'progress': False, 'episodes_per_setting': 1,
              'action_noise': (0.0, 0.3), 'max_steps': 20, 'cmax': 1e9, 'max_per_bin': 10}
    first = collect_task('BallRun', out_dir=tmp_path / 'a', **kwargs)
    np.random.seed(99)                                   # global rng state must not matter
    time.sleep(1.1)             # the clock moves on: a time stamp in the file would now differ
    second = collect_task('BallRun', out_dir=tmp_path / 'b', **kwargs)
    assert first.name == second.name
    assert hashlib.sha256(first.read_bytes()).hexdigest() == \
        hashlib.sha256(second.read_bytes()).hexdigest()


def test_dataset_file_name_follows_dsrl():
    name = dataset_file_name(get_task('BallCircle'), 80.0, 886)
    assert name == 'SafetyBallCircle-v0-80-886.hdf5'


def test_allocation_favours_sparse_settings_under_the_cut_off():
    # Setting 0 lands in a crowded cell, setting 1 alone, setting 2 above the cost cut-off.
    costs = np.array([5.0, 5.0, 5.0, 5.0, 60.0, 60.0, 500.0, 500.0])
    rewards = np.array([100.0, 100.0, 100.0, 100.0, 900.0, 900.0, 0.0, 0.0])
    setting = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    weights = allocation_weights(costs, rewards, setting, 3, cmax=80.0)
    assert weights[1] > weights[0] > weights[2] > 0


def test_cli_collect(tmp_path):
    from offline_training.data.cli import main

    agents = _random_actors(tmp_path / 'agents', 'CarRun', count=1)
    out = tmp_path / 'carrun.hdf5'
    assert main(['collect', '--task', 'CarRun', '--agent-dir', str(agents), '--out', str(out),
                 '--episodes-per-setting', '1', '--seed', '1']) == 0
    data = load_dataset(out, task='CarRun')
    assert trajectory_returns(data)[2].size >= 1


# ----------------------------------------------------------------------------- density filter

def _synthetic_returns(n=4000, seed=0):
    rng = np.random.default_rng(seed)
    costs = np.concatenate([rng.exponential(5, n // 2), rng.uniform(0, 150, n // 2)])
    rewards = 5 * costs + rng.normal(0, 40, n)
    return costs, rewards


def test_density_filter_caps_cells_and_cuts_cost():
    costs, rewards = _synthetic_returns()
    cfg = DensityFilterConfig(cbins=60, rbins=50, max_per_bin=3, cmax=80.0)
    keep = grid_filter(costs, rewards, cfg, np.random.default_rng(0))
    assert keep.size > 0 and np.all(np.diff(keep) > 0)
    assert costs[keep].max() <= 80.0
    # Re-bin the kept trajectories on the same grid: no cell holds more than the cap.
    inside = costs <= 80.0
    c_lo, c_hi = costs[inside].min(), costs[inside].max()
    r_lo, r_hi = rewards[inside].min(), rewards[inside].max()
    ci = np.minimum((costs[keep] - c_lo) // ((c_hi - c_lo) / 60), 59)
    ri = np.minimum((rewards[keep] - r_lo) // ((r_hi - r_lo) / 50), 49)
    _, counts = np.unique(ci * 50 + ri, return_counts=True)
    assert counts.max() <= 3
    # The dense low-cost corner is thinned, the sparse high-cost region kept whole.
    assert np.mean(costs[keep] <= 10) < np.mean(costs[inside] <= 10)


def test_density_filter_drops_sparse_cells():
    costs = np.array([0.0, 0.1, 0.2, 50.0, 100.0, 100.0])
    rewards = np.array([0.0, 0.0, 0.0, 10.0, 20.0, 20.0])
    cfg = DensityFilterConfig(cbins=10, rbins=10, max_per_bin=5, min_per_bin=1)
    keep = grid_filter(costs, rewards, cfg, np.random.default_rng(0))
    assert keep.tolist() == [0, 1, 2, 4, 5]  # the lone trajectory at cost 50 is dropped


def test_density_filter_is_seeded():
    costs, rewards = _synthetic_returns()
    cfg = DensityFilterConfig(max_per_bin=2, cmax=100.0)
    a = grid_filter(costs, rewards, cfg, np.random.default_rng(42))
    b = grid_filter(costs, rewards, cfg, np.random.default_rng(42))
    c = grid_filter(costs, rewards, cfg, np.random.default_rng(43))
    np.testing.assert_array_equal(a, b)
    assert a.size == c.size and not np.array_equal(a, c)


def test_density_filter_target_count_picks_the_cap():
    costs, rewards = _synthetic_returns()
    cfg = DensityFilterConfig(cmax=100.0, target_count=1000)
    keep = grid_filter(costs, rewards, cfg, np.random.default_rng(0))
    assert 1000 <= keep.size < 1300
    everything = grid_filter(costs, rewards, DensityFilterConfig(cmax=100.0, target_count=10**6),
                             np.random.default_rng(0))
    assert everything.size == int(np.sum(costs <= 100.0))


def test_density_filter_rejects_bad_input():
    with pytest.raises(ValueError, match='equal length'):
        grid_filter(np.zeros(3), np.zeros(4), DensityFilterConfig(max_per_bin=1),
                    np.random.default_rng(0))


# -------------------------------------------------------------------------------- Lagrangian

def test_multiplier_rises_above_budget_and_clamps_at_zero_below():
    lag = PIDLagrangian()
    values = [lag.update(60.0, budget=20.0) for _ in range(5)]
    assert values[0] > 0 and all(b > a for a, b in zip(values, values[1:]))
    falling = [lag.update(0.0, budget=20.0) for _ in range(200)]
    assert falling[1] < values[-1]
    assert min(falling) == 0.0 and falling[-1] == 0.0 and lag.integral == 0.0


def test_pure_dual_ascent_step():
    lag = PIDLagrangian(kp=0.0, ki=0.1, kd=0.0)
    assert lag.update(15.0, budget=10.0) == pytest.approx(0.5)
    assert lag.update(12.0, budget=10.0) == pytest.approx(0.7)
    assert lag.update(0.0, budget=10.0) == pytest.approx(0.0)
    restored = PIDLagrangian.from_state_dict(lag.state_dict())
    assert restored.update(20.0, 10.0) == pytest.approx(lag.update(20.0, 10.0))


def test_budget_schedule_anneals_linearly():
    schedule = BudgetSchedule(start=100.0, end=5.0, frac_start=0.1, frac_end=0.9)
    assert schedule(0.0) == 100.0 and schedule(0.1) == 100.0
    assert schedule(0.5) == pytest.approx(52.5)
    assert schedule(0.95) == 5.0


# ---------------------------------------------------------------- behaviour training + resume

def _tiny_config(**overrides):
    values = {'task': 'BallRun', 'total_steps': 2048, 'n_envs': 2, 'n_steps': 128,
              'batch_size': 64, 'n_epochs': 2, 'num_checkpoints': 4, 'resume_every': 256,
              'seed': 1}
    values.update(overrides)
    return BehaviorConfig(**values)


def test_behavior_training_resumes_after_a_kill(tmp_path):
    agent_dir = tmp_path / 'BallRun'
    config = _tiny_config(total_steps=100_000)
    code = ('from offline_training.collection.behavior import BehaviorConfig, train_behavior\n'
            f'train_behavior(BehaviorConfig(**{config.__dict__!r}), {str(agent_dir)!r}, '
            'progress=False)\n')
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'DSRL_SUPPRESS_IMPORT_ERROR': '1'}
    proc = subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.time() + 40
    state = None
    while time.time() < deadline:
        state = read_state(agent_dir)
        if state and state['steps'] >= 512:
            break
        assert proc.poll() is None, proc.stderr.read().decode()
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = read_state(agent_dir)
    assert killed is not None and not killed['finished'] and killed['steps'] >= 512

    # Restart in-process with a lower total: the saved config wins, but total_steps only grows,
    # so train a little further by raising it just above where the kill left the run.
    target = killed['steps'] + 512
    saved = json.loads((agent_dir / 'config.json').read_text())
    saved['total_steps'] = target
    (agent_dir / 'config.json').write_text(json.dumps(saved))
    state = train_behavior(_tiny_config(total_steps=target), agent_dir, progress=False)
    assert state['finished'] and state['restarts'] == 1
    assert target <= state['steps'] < target + 512
    rows = np.loadtxt(agent_dir / 'progress.csv', delimiter=',', skiprows=1, usecols=0)
    restart_rows = rows[rows > killed['steps']]
    assert restart_rows.size and restart_rows.min() <= killed['steps'] + 256 + 256
    # The run continued (steps never went back to zero after the restart).
    first_after = np.flatnonzero(rows > killed['steps'])[0]
    assert np.all(rows[first_after:] > killed['steps'])
    # A finished run is not trained again.
    assert train_behavior(_tiny_config(total_steps=target), agent_dir,
                          progress=False)['steps'] == state['steps']


def test_behavior_checkpoints_roll_out(tmp_path):
    state = train_behavior(_tiny_config(total_steps=1024), tmp_path / 'agent', progress=False)
    assert state['finished'] and state['steps'] >= 1024
    checkpoints = list_checkpoints(tmp_path / 'agent')
    assert len(checkpoints) == 5  # step 0 and four along training
    actor = NumpyActor.load(checkpoints[-1])
    assert actor.meta['task'] == 'BallRun' and actor.meta['steps'] >= 1024
    assert actor.mean(np.zeros(7)).shape == (2,)
    assert checkpoints[-1].stat().st_size < 64 * 1024  # small enough to commit


def test_checkpoints_carry_the_observation_normaliser_the_policy_saw(tmp_path):
    from stable_baselines3.common.vec_env import VecNormalize

    agent_dir = tmp_path / 'agent'
    train_behavior(_tiny_config(total_steps=512, normalize_observations=True), agent_dir,
                   progress=False)
    actor = NumpyActor.load(list_checkpoints(agent_dir)[-1])
    # The last checkpoint is frozen at the last rollout's end: its statistics are those of the
    # final VecNormalize state (they only move while collecting), and its mean action is the MLP
    # on VecNormalize's normalised observation, far-out values clipped at +-10 as in training.
    venv = VecNormalize.load(str(agent_dir / 'resume' / 'vecnormalize.pkl'),
                             make_training_envs(_tiny_config(), PenaltyState(), 0))
    np.testing.assert_array_equal(actor.obs_mean, venv.obs_rms.mean)
    np.testing.assert_array_equal(actor.obs_var, venv.obs_rms.var)
    obs = np.random.default_rng(0).normal(0.0, 3.0, size=(16, 7))
    obs[0] = 1e6
    raw_mlp = NumpyActor(actor.weights, actor.log_std)
    np.testing.assert_allclose(actor.mean(obs), raw_mlp.mean(venv.normalize_obs(obs)),
                               rtol=1e-5, atol=1e-8)  # VecNormalize works in float32
    assert np.abs(venv.normalize_obs(obs)[0]).max() == 10.0
    venv.close()
    # agents trained before the option existed have no normaliser and still load
    plain = tmp_path / 'plain'
    train_behavior(_tiny_config(total_steps=256), plain, progress=False)
    assert NumpyActor.load(list_checkpoints(plain)[-1]).obs_mean is None


def test_max_steps_stops_early_and_resumes(tmp_path):
    agent_dir = tmp_path / 'agent'
    first = train_behavior(_tiny_config(), agent_dir, max_steps=512, progress=False)
    assert not first['finished'] and 512 <= first['steps'] < 2048
    lam = first['lagrangian']['multiplier']
    second = train_behavior(_tiny_config(), agent_dir, progress=False)
    assert second['finished'] and second['steps'] >= 2048 and second['restarts'] == 1
    assert PIDLagrangian.from_state_dict(first['lagrangian']).multiplier == lam


# ------------------------------------------------------------------- committed behaviour agents

def test_committed_behavior_agents_load():
    root = REPO / 'behavior_agents'
    folders = sorted(p for p in root.glob('*') if (p / 'config.json').exists())
    for folder in folders:
        spec = get_task(folder.name)
        config = BehaviorConfig.from_dict(json.loads((folder / 'config.json').read_text()))
        assert config.task == spec.name
        checkpoints = list_checkpoints(folder)
        assert checkpoints, f'{folder} has a config but no checkpoints'
        actor = NumpyActor.load(checkpoints[-1])
        assert actor.mean(np.zeros(spec.obs_dim)).shape == (spec.act_dim,)


def test_checkpoints_of_extra_runs_follow_the_main_run(tmp_path):
    _random_actors(tmp_path, 'BallRun', count=2)
    _random_actors(tmp_path / 'up', 'BallRun', count=1)
    names = [f'{p.parent.parent.name}/{p.name}' for p in list_checkpoints(tmp_path)]
    assert names == [f'{tmp_path.name}/step_000000000.npz', f'{tmp_path.name}/step_000000001.npz',
                     'up/step_000000000.npz']


def test_train_task_skips_finished_runs_and_extends_raised_ones(tmp_path):
    from offline_training.collection.train_all import train_task

    tiny = {k: v for k, v in _tiny_config().__dict__.items() if k != 'task'}
    train_task('BallRun', tmp_path, progress=False, **{**tiny, 'total_steps': 512})
    first = read_state(tmp_path)
    assert first['finished'] and first['steps'] >= 512
    train_task('BallRun', tmp_path, progress=False, **{**tiny, 'total_steps': 512})
    assert read_state(tmp_path) == first  # skipped: not even the restart counter moved
    train_task('BallRun', tmp_path, progress=False, **{**tiny, 'total_steps': 1024})
    raised = read_state(tmp_path)
    assert raised['finished'] and raised['steps'] >= 1024 and raised['restarts'] == 1
