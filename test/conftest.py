"""Shared test setup: quiet dsrl import, headless plots, one torch thread, small datasets."""

import os

os.environ.setdefault('DSRL_SUPPRESS_IMPORT_ERROR', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
os.environ.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
# One intra-op thread for torch and onnxruntime's OpenMP: on 2 cores shared with DDS and PyBullet
# a second thread makes small-batch training many times slower, not faster.
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MKL_NUM_THREADS', '1')

import sys  # noqa: E402

import pytest  # noqa: E402

# bullet_safety_gym flushes the C stream named after sys.stdout/stderr, which under pytest's
# capture is no C symbol: import it with the real stderr in place, then patch the flush.
_captured_stderr, sys.stderr = sys.stderr, sys.__stderr__
try:
    from offline_training.data.tasks import make_bullet_safety_gym_capture_safe  # noqa: E402
    make_bullet_safety_gym_capture_safe()
finally:
    sys.stderr = _captured_stderr


@pytest.fixture
def ballcircle_arrays():
    """Return a small valid synthetic BallCircle dataset (DSRL arrays)."""
    from offline_training.data.synthetic import synthetic_dataset
    return synthetic_dataset('BallCircle', episodes=6, seed=0, max_length=40)
