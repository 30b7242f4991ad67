"""DSPO (offline_training.algos.dspo) and its data: split-demos, losses, networks, runs."""

import h5py
import numpy as np
from offline_training.data import cli
from offline_training.data.dataset import (COST_LABELS_ATTR, load_dataset, UNLABELLED,
                                           validate_arrays, write_dataset)
from offline_training.data.synthetic import synthetic_dataset
from offline_training.data.trajectories import episode_spans, split_safe_demos
import pytest
import torch

torch.set_num_threads(1)

TASK = 'BallCircle'


def labelled(episodes=16, seed=0, length=24):
    """
    Return a synthetic dataset whose trajectory i has cost return i and reward return -i/2.

    Trajectory 3 gets the largest reward, so the rule must order by reward, not by index.
    """
    data = synthetic_dataset(TASK, episodes=episodes, seed=seed, max_length=length)
    starts, stops = episode_spans(data)
    data['costs'] = np.zeros_like(data['costs'])
    data['rewards'] = np.zeros_like(data['rewards'])
    for i, (start, stop) in enumerate(zip(starts, stops)):
        data['costs'][stop - 1] = float(i)
        data['rewards'][start] = 100.0 if i == 3 else -0.5 * i
    return data


# --------------------------------------------------------------------------- split-demos

def test_split_rule_takes_the_highest_rewards_among_safe_trajectories():
    split = split_safe_demos(labelled(), kappa=6.0, num_demos=4)
    # safe: 0..6; rewards 0, -0.5, -1, 100, -2, -2.5, -3 -> top four: 3, 0, 1, 2
    assert split.demos.tolist() == [0, 1, 2, 3]
    assert split.unlabelled.tolist() == list(range(4, 16))
    assert split.num_safe == 7


def test_split_demos_writes_two_validated_cost_free_files(tmp_path):
    path = tmp_path / 'SafetyBallCircle-v0-test.hdf5'
    data = labelled()
    write_dataset(path, data, TASK)
    assert cli.main(['split-demos', str(path), '--kappa', '6', '--num-demos', '4',
                     '-o', str(tmp_path / 'split' / 'bc')]) == 0
    unlabelled_path, demos_path = cli.split_paths(tmp_path / 'split' / 'bc')
    starts, stops = episode_spans(data)
    for path_, indices in ((demos_path, [0, 1, 2, 3]), (unlabelled_path, range(4, 16))):
        part = load_dataset(path_)                  # validated, NaN costs accepted (marked)
        assert np.isnan(part['costs']).all()
        rows = np.concatenate([np.arange(starts[i], stops[i]) for i in indices])
        np.testing.assert_array_equal(part['observations'], data['observations'][rows])
        np.testing.assert_array_equal(part['rewards'], data['rewards'][rows])
        with h5py.File(path_, 'r') as h5:
            assert h5.attrs[COST_LABELS_ATTR] == UNLABELLED


def test_split_demos_bad_inputs_fail_in_one_line(tmp_path, capsys):
    path = tmp_path / 'SafetyBallCircle-v0-test.hdf5'
    write_dataset(path, labelled(), TASK)
    prefix = str(tmp_path / 'out')
    cases = [(['--kappa', '-1'], 'kappa must be a finite cost budget'),
             (['--kappa', 'nan'], 'kappa must be a finite cost budget'),
             (['--kappa', '2', '--num-demos', '4'], 'only 3 of 16 trajectories'),
             (['--kappa', '100', '--num-demos', '16'], 'no unlabelled data'),
             (['--kappa', '5', '--num-demos', '0'], 'must be >= 1')]
    for extra, message in cases:
        assert cli.main(['split-demos', str(path), *extra, '-o', prefix]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not list(tmp_path.glob('out*'))
    # an already cost-free file cannot be split again
    assert cli.main(['split-demos', str(path), '--kappa', '6', '--num-demos', '4',
                     '-o', prefix]) == 0
    capsys.readouterr()
    assert cli.main(['split-demos', prefix + '-demos.hdf5', '--task', TASK, '--kappa', '6',
                     '-o', str(tmp_path / 'again')]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'has no cost labels' in err[0]


def test_nan_costs_are_accepted_only_in_a_file_marked_unlabelled(tmp_path):
    data = labelled()
    data['costs'] = np.full_like(data['costs'], np.nan)
    problems = validate_arrays(data, TASK)
    assert problems and COST_LABELS_ATTR in str(problems[0])
    assert validate_arrays(data, TASK, unlabelled=True) == []
    data['costs'][5] = 0.0                       # one label left in a cost-free file
    problems = validate_arrays(data, TASK, unlabelled=True)
    assert len(problems) == 1 and 'every cost must be NaN' in str(problems[0])
    with pytest.raises(Exception, match='NaN or Inf'):
        write_dataset(tmp_path / 'x.hdf5', {**data, 'costs': np.full_like(data['costs'],
                                                                          np.nan)}, TASK)
