"""Same configuration and seed, same run: seeded simulator resets and simulation time (issue 9)."""

from pathlib import Path
import random

import numpy as np
import pytest
from saferl_ros.sim import seeded_global_rngs, SimEpisodes
from saferl_ros.tasks import get_task
from test_ros_support import build_bundle, domain_fixture, recorded

ros_domain = domain_fixture(77)
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / 'models' / 'fisor-ballcircle'


def test_seeded_global_rngs_restores_the_previous_states():
    np.random.seed(123)
    random.seed(123)
    expected = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    with seeded_global_rngs(7):
        inside = np.random.random(), random.random()
    with seeded_global_rngs(7):
        assert (np.random.random(), random.random()) == inside
    assert (np.random.random(), random.random()) == expected


def test_reset_is_reproducible_and_leaves_the_global_rngs_alone():
    np.random.seed(99)
    random.seed(99)
    np_state, py_state = np.random.get_state(), random.getstate()
    first, second, other = (SimEpisodes('BallCircle', seed=s) for s in (3, 3, 4))
    try:
        obs = first.reset()
        np.testing.assert_array_equal(second.reset(), obs)
        assert not np.allclose(other.reset(), obs)
        # The global rngs are as before: the reset drew from seeded, restored states.
        after = np.random.get_state()
        assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
        assert after[2:] == np_state[2:]
        assert random.getstate() == py_state
        # Episode k starts from the same state whatever happened before it.
        for _ in range(10):
            first.step(np.ones(first.act_dim))
        np.testing.assert_array_equal(first.reset(), second.reset())
        assert first.episode == second.episode == 1
    finally:
        for sim in (first, second, other):
            sim.close()


@pytest.mark.parametrize('task', ['BallCircle', 'BallRun'])
def test_control_period_is_the_simulators(task):
    sim = SimEpisodes(task)
    try:
        assert sim.dt == pytest.approx(sim.env.unwrapped.dt)
        assert sim.dt == pytest.approx(get_task(task).control_period)
    finally:
        sim.close()


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    if (SHIPPED / 'manifest.yaml').is_file():
        return str(SHIPPED)
    return build_bundle(tmp_path_factory.mktemp('bundle') / 'fisor')


def run_sim_yaml(bundle: str, out: Path, name: str, episodes: int = 2, horizon: int = 80):
    from saferl_ros.bringup import run
    return run(REPO / 'config' / 'sim.yaml', episodes=episodes, quiet=True, overrides=[
        f'controller_node.bundle={bundle}', f'safety_monitor_node.bundle={bundle}',
        f'recorder_node.bundle={bundle}', f'recorder_node.monitor_bundle={bundle}',
        f'recorder_node.output_dir={out}', f'recorder_node.run_name={name}',
        f'sim_node.horizon={horizon}'])


@pytest.mark.ros
def test_two_runs_of_the_same_config_are_identical(bundle, tmp_path):
    from saferl_ros.monitor import MonitorState
    summaries = [run_sim_yaml(bundle, tmp_path, name) for name in ('a', 'b')]
    data = [recorded(tmp_path / name) for name in ('a', 'b')]
    for key in ('reward', 'cost', 'steps', 'missed'):
        assert [e[key] for e in summaries[0]['episodes']] == \
            [e[key] for e in summaries[1]['episodes']], key
    assert [e['missed'] for e in summaries[0]['episodes']] == [0, 0]
    for key in ('observations', 'actions', 'proposed_actions', 'rewards', 'costs', 'verdicts',
                'stamps_ns'):
        np.testing.assert_array_equal(data[0][key], data[1][key], err_msg=key)
    # Lock-step stamps are simulation time: 0, dt, 2 dt, ... straight across the episode
    # boundary (unique), whatever the machine load; so the monitor never saw a stale input.
    dt_ns = round(get_task('BallCircle').control_period * 1e9)
    np.testing.assert_array_equal(data[0]['stamps_ns'], np.arange(160, dtype=np.int64) * dt_ns)
    assert not np.isin(data[0]['verdicts'], [MonitorState.STALE, MonitorState.FAULT]).any()
    # Latency is still measured in wall time (observation published -> command received).
    latency = summaries[0]['latency']
    assert latency['count'] == 160 and 0 < latency['p50_ms'] < 1000


@pytest.mark.ros
def test_sim_node_refuses_to_follow_sim_time(tmp_path):
    from saferl_ros.bringup import BringupError, run
    config = tmp_path / 'sim_only.yaml'
    config.write_text('sim_node:\n  ros__parameters:\n    task: BallCircle\n'
                      '    use_sim_time: true\n')
    with pytest.raises(BringupError, match='use_sim_time'):
        run(config, episodes=1, quiet=True)
