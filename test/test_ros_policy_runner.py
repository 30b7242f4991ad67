"""Policy runner over a real (tiny) bundle: checks, reproducibility, latency."""

import math

import numpy as np
import pytest
from saferl_ros.bundle import load_bundle
from saferl_ros.observation import channel_names, ObservationError
from saferl_ros.policy_runner import PolicyInputError, PolicyRunner
from test_ros_support import build_bundle


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    return load_bundle(build_bundle(tmp_path_factory.mktemp('b') / 'fisor'))


def test_same_seed_same_actions_and_actions_in_bounds(bundle):
    obs = np.random.default_rng(0).normal(scale=0.3, size=(10, 8)).astype(np.float32)
    first, second = PolicyRunner(bundle, seed=5), PolicyRunner(bundle, seed=5)
    a = [first.act(o) for o in obs]
    runner = second
    b = [runner.act(o) for o in obs]
    assert not np.array_equal(a, [PolicyRunner(bundle, seed=6).act(o) for o in obs])
    np.testing.assert_array_equal(a, b)
    assert np.all(np.abs(b) <= 1.0)
    assert runner.latency.summary()['count'] == 10


def test_bad_inputs_are_refused(bundle):
    runner = PolicyRunner(bundle, channels=channel_names('BallCircle'))
    with pytest.raises(PolicyInputError, match='entries'):
        runner.act(np.zeros(7))
    with pytest.raises(PolicyInputError, match='NaN'):
        runner.act([math.nan] + [0.0] * 7)
    with pytest.raises(ObservationError, match='missing'):
        PolicyRunner(bundle, channels=channel_names('BallRun'))
