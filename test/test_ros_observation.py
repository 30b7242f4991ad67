"""Observation channel names against the real Bullet-Safety-Gym environments."""

import numpy as np
import pytest
from saferl_ros.observation import (channel_names, channels, check_channels, ObservationError,
                                    parse_task)
from saferl_ros.sim import make_gym_env

TASKS = ['BallCircle', 'CarCircle', 'DroneCircle', 'AntCircle',
         'BallRun', 'CarRun', 'DroneRun', 'AntRun']


@pytest.fixture(scope='module')
def envs():
    made = {t: make_gym_env(f'Safety{t}-v0') for t in TASKS}
    yield made
    for env in made.values():
        env.close()


@pytest.mark.parametrize('task', TASKS)
def test_channel_count_matches_real_env(envs, task):
    env = envs[task]
    names = channel_names(task)
    assert len(names) == env.observation_space.shape[0]
    assert len(set(names)) == len(names), 'channel names must be unique'
    obs, _ = env.reset(seed=0)
    assert obs.shape == (len(names),)


def test_ant_joint_and_feet_names_match_the_simulator(envs):
    agent = envs['AntRun'].unwrapped.agent
    names = channel_names('AntRun')
    motors = [m.name for m in agent.motor_list]
    assert names[13:29:2] == [f'{m}_pos' for m in motors]
    assert names[29:] == [f'{f}_contact' for f in agent.foot_list]


@pytest.mark.parametrize('task', ['BallCircle', 'CarCircle', 'DroneRun'])
def test_values_follow_the_documented_scales(envs, task):
    """Rebuild the leading position/velocity entries from the simulator state with the scales."""
    env = envs[task]
    obs, _ = env.reset(seed=3)
    for _ in range(5):
        obs, *_ = env.step(env.action_space.sample())
    agent = env.unwrapped.agent
    pos, vel = agent.get_position(), agent.get_linear_velocity()
    spec = {c.name: c for c in channels(task)}
    names = channel_names(task)
    for axis, k in (('x', 0), ('y', 1)):
        assert obs[names.index(axis)] == pytest.approx(spec[axis].scale * pos[k], abs=1e-5)
        expected_v = spec['v' + axis].scale * vel[k]
        assert obs[names.index('v' + axis)] == pytest.approx(expected_v, abs=1e-5)
    if 'circle_dist' in names:
        expected = (np.linalg.norm(pos[:2]) - env.unwrapped.task.circle.radius) / \
            env.unwrapped.world.env_dim
        assert obs[names.index('circle_dist')] == pytest.approx(expected, abs=1e-5)


def test_task_name_forms():
    assert parse_task('SafetyCarRun-v0') == ('Car', 'Run')
    assert parse_task('OfflineAntCircle-v0') == ('Ant', 'Circle')
    assert channel_names('ballcircle') == channel_names('BallCircle')
    with pytest.raises(ObservationError, match='unknown task'):
        parse_task('HumanoidRun')


def test_check_channels_refuses_reorder_and_mismatch():
    names = channel_names('BallCircle')
    check_channels(names, list(names))
    swapped = list(names)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    with pytest.raises(ObservationError, match='different order'):
        check_channels(names, swapped)
    with pytest.raises(ObservationError, match='missing'):
        check_channels(names, names[:-1])
