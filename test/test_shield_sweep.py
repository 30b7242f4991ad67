"""The monitor-threshold sweep: one evaluation per threshold and seed, a suggestion, files."""

import json
from pathlib import Path

from offline_training.shield_sweep import main, suggestion
import pytest
from saferl_ros.monitor import boundary_at, MonitorConfigError

MODELS = Path(__file__).resolve().parents[1] / 'models'


def test_extreme_thresholds_replace_nothing_or_everything(tmp_path):
    out = tmp_path / 'sweep'
    assert main([str(MODELS / 'bc_all-ballcircle'), str(MODELS / 'fisor-ballcircle'),
                 '--thresholds', '-1000000', '1e9', '--seeds', '0', '--episodes', '1',
                 '--no-progress', '-o', str(out)]) == 0
    report = json.loads((out / 'sweep.json').read_text())
    alone, everything, nothing = report['rows']
    assert alone['threshold'] is None and alone['replaced_share'] == 0
    # a boundary above every V_h/Q_h lets every proposal through: the policy's own episode
    assert nothing['replaced_share'] == 0 and nothing['reward'] == alone['reward']
    assert nothing['reward_kept'] == pytest.approx(1.0)
    # a boundary below every value: every action replaced or kept only when nothing was safer
    assert everything['replaced_share'] > 0.5 and everything['reward'] != alone['reward']
    assert (out / 'sweep.png').stat().st_size > 0
    assert '| policy alone | 0 |' in (out / 'sweep.md').read_text()


def test_suggestion_is_the_smallest_threshold_safe_and_rewarding_on_every_seed():
    def row(threshold, seed, cost, safe, kept):
        return {'threshold': threshold, 'seed': seed, 'cost': cost, 'safe_fraction': safe,
                'reward_kept': kept}
    rows = [row(None, 0, 3.0, 0.0, 1.0), row(None, 1, 3.0, 0.0, 1.0),
            row(1.0, 0, 0.0, 1.0, 0.6), row(1.0, 1, 0.0, 1.0, 0.9),     # too little reward
            row(3.0, 0, 0.0, 1.0, 0.85), row(3.0, 1, 0.5, 0.95, 0.9),   # one episode unsafe
            row(5.0, 0, 0.2, 1.0, 0.9), row(5.0, 1, 0.4, 1.0, 0.81),
            row(9.0, 0, 2.0, 0.5, 1.0), row(9.0, 1, 0.0, 1.0, 1.0)]
    assert suggestion(rows, 0.8) == 5.0
    # a policy that earns nothing alone has no reward share to keep: never suggested
    assert suggestion([row(2.0, 0, 0.0, 1.0, None)], 0.8) is None
    assert suggestion(rows, 0.95) is None
    # where each critic kind's boundary is moved
    assert boundary_at('cost_ucb', 2.0) == {'budget': 2.0}
    assert boundary_at('cost', 2.0) == {'budget': 2.0}       # BCQ-Lag's cost critic
    with pytest.raises(MonitorConfigError, match="critic kind 'none'"):
        boundary_at('none', 2.0)
    assert boundary_at('feasibility', 2.0) == {'threshold_v': 2.0, 'threshold_q': 2.0}
