"""Shared test setup: quiet dsrl import, headless plots, one torch thread, small datasets."""

import importlib.util
import os
import sys

os.environ.setdefault('DSRL_SUPPRESS_IMPORT_ERROR', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
# One intra-op thread for torch and onnxruntime's OpenMP: on 2 cores shared with DDS and PyBullet
# a second thread makes small-batch training many times slower, not faster.
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MKL_NUM_THREADS', '1')


import pytest  # noqa: E402

# bullet_safety_gym flushes the C stream named after sys.stdout/stderr, which under pytest's
# capture is no C symbol: import it once, safely, before any test creates an environment.
# A machine without it (a lent GPU machine, which has no PyBullet) can still run the tests that
# need no simulator, e.g. `pytest test/test_train.py -k cuda`; the others fail there by name.
if importlib.util.find_spec('bullet_safety_gym') is not None:
    from saferl_ros.sim import import_bullet_safety_gym  # noqa: E402
    import_bullet_safety_gym()


@pytest.fixture(autouse=True)
def _torch_threads_as_configured():
    """
    Give every test the configured torch thread count, whatever an earlier test set.

    Console-script mains called in-process (saferl-export sets 2 threads, saferl-train and
    saferl-eval their --threads) change torch's process-wide setting; a small model's result
    depends on it (reduction order), so a test must not inherit it from the one before.
    """
    yield
    torch = sys.modules.get('torch')
    wanted = int(os.environ.get('OMP_NUM_THREADS', '1') or 1)
    if torch is not None and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


@pytest.fixture
def ballcircle_arrays():
    """Return a small valid synthetic BallCircle dataset (DSRL arrays)."""
    from offline_training.data.synthetic import synthetic_dataset
    return synthetic_dataset('BallCircle', episodes=6, seed=0, max_length=40)
