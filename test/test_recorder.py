"""Recorder writer: DSRL-valid files, dsrl's own loader, and SIGKILL safety."""

import json
import math
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
from offline_training.data.dataset import load_dataset, validate_file
import pytest
from saferl_ros.monitor import MonitorState
from saferl_ros.recorder import (check_new_run_dir, consolidate, non_finite_fields, read_index,
                                 RecordingError, RecordingWriter, Step)
from saferl_ros.sim import make_gym_env, SimEpisodes

TASK = 'BallCircle'


def record_sim(run_dir, episodes=2, steps=30, seed=0):
    """Record real BallCircle steps (random actions), cutting episodes after ``steps``."""
    sim = SimEpisodes(TASK, seed=seed)
    writer = RecordingWriter(run_dir, TASK, 8, 2, attrs={'bundle_sha256': 'ab' * 32})
    rng = np.random.default_rng(seed)
    for _ in range(episodes):
        obs = sim.reset()
        for t in range(steps):
            proposed = rng.uniform(-1, 1, 2).astype(np.float32)
            action = proposed if t % 5 else np.zeros(2, np.float32)
            result = sim.step(action)
            writer.add(Step(obs, action, result.reward, result.cost, result.observation,
                            stamp_ns=t * 20_000_000, proposed=proposed,
                            verdict=int(MonitorState.NOMINAL if t % 5 else
                                        MonitorState.INTERVENING),
                            v_h=-1.0, q_h=-0.5))
            obs = result.observation
        writer.end_episode(terminal=False, timeout=True)
    sim.close()
    return writer


def test_episodes_validate_and_load_with_dsrl(tmp_path):
    writer = record_sim(tmp_path / 'run')
    out = writer.close()
    assert out == tmp_path / 'run' / 'recording.hdf5'
    assert validate_file(out) == []
    for entry in read_index(tmp_path / 'run')['episodes']:
        assert validate_file(tmp_path / 'run' / entry['file']) == []
    data = load_dataset(out)
    assert data['observations'].shape == (60, 8)
    assert data['timeouts'].sum() == 2 and data['terminals'].sum() == 0
    assert set(np.unique(data['episode_ids'])) == {0, 1}
    assert (data['verdicts'] == MonitorState.INTERVENING).sum() == 12
    np.testing.assert_array_equal(data['actions'][::5], 0)
    offline = make_gym_env('OfflineBallCircle-v0')
    dsrl_data = offline.unwrapped.get_dataset(str(out))
    np.testing.assert_allclose(dsrl_data['observations'], data['observations'])
    assert dsrl_data['costs'].dtype == np.float32
    with h5py.File(out) as h5:
        assert h5.attrs['bundle_sha256'] == 'ab' * 32
        assert json.loads(h5.attrs['verdict_names'])[1] == 'INTERVENING'


def test_close_keeps_partial_episode_as_truncation(tmp_path):
    writer = RecordingWriter(tmp_path / 'r', TASK, 8, 2)
    obs = np.zeros(8, np.float32)
    for t in range(3):
        nxt = obs + 0.1
        writer.add(Step(obs, np.zeros(2), 0.0, 0.0, nxt))
        obs = nxt
    out = writer.close()
    assert validate_file(out) == []
    index = read_index(tmp_path / 'r')
    assert index['closed'] and index['episodes'][0]['partial']
    with pytest.raises(RecordingError, match='already exists'):
        RecordingWriter(tmp_path / 'r', TASK, 8, 2)


def test_wrong_sizes_are_refused(tmp_path):
    writer = RecordingWriter(tmp_path / 'r', TASK, 8, 2)
    with pytest.raises(RecordingError, match='entries'):
        writer.add(Step(np.zeros(7), np.zeros(2), 0, 0, np.zeros(8)))


@pytest.mark.parametrize('field, value', [
    ('observation', [math.nan] + [0.0] * 7), ('next_observation', [0.0] * 7 + [math.inf]),
    ('action', [0.0, -math.inf]), ('reward', math.nan), ('cost', math.inf), ('reward', 'x'),
])
def test_non_finite_steps_are_refused_by_name(tmp_path, field, value):
    """Review 14: one NaN/Inf step made the whole run fail validation and merge."""
    step = Step(np.zeros(8), np.zeros(2), 0.0, 0.0, np.zeros(8))
    assert non_finite_fields(step) == []
    setattr(step, field, value)
    assert non_finite_fields(step) == [field]
    writer = RecordingWriter(tmp_path / 'r', TASK, 8, 2)
    with pytest.raises(RecordingError, match=f'NaN or Inf in {field}'):
        writer.add(step)
    assert writer.steps == []
    # the extras may hold NaN ("not computed"): accepted
    writer.add(Step(np.zeros(8), np.zeros(2), 0.0, 0.0, np.zeros(8), v_h=math.nan,
                    proposed=np.full(2, np.nan)))
    assert len(writer.steps) == 1


def test_a_run_folder_in_use_is_refused_naming_it(tmp_path):
    check_new_run_dir(tmp_path / 'absent')           # absent: free
    (tmp_path / 'empty').mkdir()
    check_new_run_dir(tmp_path / 'empty')            # empty: free
    RecordingWriter(tmp_path / 'used', TASK, 8, 2)
    with pytest.raises(RecordingError, match=r'used already exists and holds episodes, '
                                             r'index.json; .*set run_name to a new name'):
        check_new_run_dir(tmp_path / 'used')
    (tmp_path / 'file').write_text('x')
    with pytest.raises(RecordingError, match='is not a folder'):
        check_new_run_dir(tmp_path / 'file')


CHILD = r"""
import sys
import numpy as np
from saferl_ros.recorder import RecordingWriter, Step
writer = RecordingWriter(sys.argv[1], 'BallCircle', 8, 2)
rng = np.random.default_rng(0)
episode = 0
while True:
    obs = rng.normal(size=8).astype(np.float32)
    for t in range(40):
        nxt = obs + rng.normal(scale=0.01, size=8).astype(np.float32)
        writer.add(Step(obs, rng.uniform(-1, 1, 2), 1.0, float(t % 7 == 0), nxt))
        obs = nxt
    writer.end_episode(terminal=False, timeout=True)
    print('done', episode, flush=True)
    episode += 1
"""


@pytest.mark.parametrize('extra_delay', [0.0, 0.013, 0.031])
def test_sigkill_mid_episode_keeps_completed_episodes(tmp_path, extra_delay):
    run = tmp_path / 'run'
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1])}
    child = subprocess.Popen([sys.executable, '-c', CHILD, str(run)], stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        done = 0
        deadline = time.monotonic() + 60
        while done < 3 and time.monotonic() < deadline:
            if child.stdout.readline().startswith('done'):
                done += 1
        time.sleep(extra_delay)   # kill at varying points: mid-episode or mid-write
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    assert done >= 3
    index = read_index(run)
    assert not index['closed']
    assert len(index['episodes']) >= 3
    for entry in index['episodes']:
        assert validate_file(run / entry['file']) == [], entry
    out = consolidate(run)
    assert validate_file(out) == []
    data = load_dataset(out)
    assert data['observations'].shape[0] == 40 * len(index['episodes'])
    assert not list(run.rglob('.*.tmp'))


def test_saferl_data_merge_builds_a_retraining_dataset(tmp_path, ballcircle_arrays, capsys):
    from offline_training.data.cli import main
    from offline_training.data.dataset import write_dataset
    existing = tmp_path / 'existing.hdf5'
    write_dataset(existing, ballcircle_arrays, 'BallCircle')
    record_sim(tmp_path / 'run')     # never closed: merged from its index, like after a crash
    out = tmp_path / 'merged.hdf5'
    assert main(['merge', str(tmp_path / 'run'), '--dataset', str(existing), '--task',
                 'BallCircle', '-o', str(out)]) == 0
    merged = load_dataset(out)
    n_old = len(ballcircle_arrays['observations'])
    assert merged['observations'].shape[0] == n_old + 60
    np.testing.assert_allclose(merged['observations'][:n_old], ballcircle_arrays['observations'])
    with h5py.File(out) as h5:
        sources = json.loads(h5.attrs['merged_from'])
    assert [s['transitions'] for s in sources] == [n_old, 60]
    # not a recording folder (and an existing -o is refused, never overwritten)
    assert main(['merge', str(tmp_path), '--task', 'BallCircle', '-o',
                 str(tmp_path / 'other.hdf5')]) == 2
    assert main(['merge', str(tmp_path / 'run'), '--task', 'BallCircle', '-o', str(out)]) == 2
    assert load_dataset(out)['observations'].shape[0] == n_old + 60
    # a BallCircle run is not merged as CarCircle data (the same shapes: nothing else notices)
    assert main(['merge', str(tmp_path / 'run'), '--task', 'CarCircle', '-o',
                 str(tmp_path / 'car.hdf5')]) == 2
    assert not (tmp_path / 'car.hdf5').exists()
    assert "index.json says the run recorded task 'BallCircle' but CarCircle was given" in \
        capsys.readouterr().err
