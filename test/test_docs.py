"""What the documentation shows agrees with the code: dsrl's loader call, the demo's figures."""

import json
from pathlib import Path
import re

import numpy as np
from offline_training.data.dataset import write_dataset
import pytest
from saferl_ros.monitor import MonitorCounters

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]


def test_docs_call_dsrls_loader_on_the_unwrapped_environment():
    """Under gymnasium 1.x wrappers do not forward get_dataset (issue 9, finding 10)."""
    showing = [doc for doc in DOCS if 'get_dataset' in doc.read_text()]
    assert showing, 'no document shows how to load a file with dsrl'
    for doc in showing:
        assert '.unwrapped.get_dataset(' in doc.read_text(), \
            f'{doc.relative_to(REPO)} shows get_dataset without the unwrapped environment'


def test_the_documented_loader_call_works(tmp_path, ballcircle_arrays):
    gym = pytest.importorskip('gymnasium')
    pytest.importorskip('dsrl')
    path = tmp_path / 'SafetyBallCircle-v0-80-6.hdf5'
    write_dataset(path, ballcircle_arrays, 'BallCircle')
    env = gym.make('OfflineBallCircle-v0')
    try:
        data = env.unwrapped.get_dataset(str(path))
        np.testing.assert_allclose(data['rewards'], ballcircle_arrays['rewards'])
        with pytest.raises(AttributeError):
            env.get_dataset(str(path))
    finally:
        env.close()


def _demo_output(text: str):
    """Return the episode rows and the monitor counters of the saferl-demo block in docs."""
    block = next(b for b in text.split('```') if 'episode steps' in b and 'monitor: {' in b)
    lines = block.strip().splitlines()
    header = lines[0].split()
    column = header.index('fallback')   # the fields before it are one word each
    rows = [line.split() for line in lines[1:] if re.match(r'\s*\d+\s+\d+\s', line)]
    counters = json.loads(next(line for line in lines
                               if line.startswith('monitor: ')).split(': ', 1)[1])
    return rows, column, counters


def test_ros_docs_demo_figures_follow_the_monitors_counters():
    """docs/ros.md shows the demo as it runs now: replaced vs kept (issue 9, finding 10)."""
    text = (REPO / 'docs' / 'ros.md').read_text()
    rows, column, counters = _demo_output(text)
    assert {'replaced', 'kept'} <= set(counters), f'counters without replaced/kept: {counters}'
    assert set(counters) == set(MonitorCounters().as_dict()), counters
    assert counters['replaced'] + counters['kept'] == \
        counters['intervening'] + counters['recovery'], counters
    # the fallback column counts the steps whose action was replaced, not every judged step
    assert sum(int(row[column]) for row in rows) == counters['replaced']
    steps = sum(int(row[1]) for row in rows)
    share = re.search(r'replaced (\d+) \((\d+) % of all steps', text)
    assert share, 'docs/ros.md does not state the share of replaced steps'
    assert int(share.group(1)) == counters['replaced']
    assert int(share.group(2)) == round(100 * counters['replaced'] / steps)
