"""
How well a DSPO discriminator's safety signal z_tau separates safe from unsafe trajectories.

    python -m offline_training.discriminator_quality RUN LABELLED.hdf5 --kappa 10 [-o OUT.json]
        [--only PREFIX-unlabelled.hdf5]

``LABELLED.hdf5`` is any labelled dataset of the run's task: the held-out trajectories that
``saferl-data split-demos --holdout`` keeps (never seen in training), or the source dataset
(the paper's Table 2 measures recall on the unlabelled data it trained on: ``--only`` a split
file keeps the source trajectories that file was made of). The true label of a
trajectory is "safe" when its cost return is <= kappa; the model reads no costs, only this
report does. Reported: ROC AUC of z against safety, Pearson correlations of z with safety (Table
2's "Pear Corr.") and with the reward return (how return-agnostic z is), and recall, precision
and accuracy at z > 0.5.
"""

import argparse
import json
import sys

import numpy as np
from offline_training.data.dataset import DatasetError, load_dataset
from offline_training.data.trajectories import trajectory_returns
from saferl_ros.errors import ConfigError, reports_user_errors


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Return the ROC AUC: P(score of a positive > score of a negative), ties counting 1/2."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    count_pos, count_neg = int(positive.sum()), int((~positive).sum())
    if count_pos == 0 or count_neg == 0:
        return float('nan')
    order = np.argsort(scores, kind='mergesort')
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):                     # average ranks over ties (Mann-Whitney U)
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = 0.5 * (i + j) + 1.0
        i = j + 1
    u = ranks[positive].sum() - count_pos * (count_pos + 1) / 2.0
    return float(u / (count_pos * count_neg))


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Return the Pearson correlation of x and y (NaN if either is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt((x * x).sum() * (y * y).sum())
    return float((x * y).sum() / norm) if norm > 0 else float('nan')


def quality(z: np.ndarray, returns: np.ndarray, safe: np.ndarray,
            threshold: float = 0.5) -> dict:
    """Return the quality figures of safety signals ``z`` against the truth ``safe``."""
    safe = np.asarray(safe, dtype=bool)
    predicted = np.asarray(z) > threshold
    hits = int((predicted & safe).sum())
    return {'trajectories': int(len(z)), 'safe_share': float(safe.mean()),
            'auc': roc_auc(z, safe), 'pearson_z_safe': pearson(z, safe),
            'pearson_z_return': pearson(z, returns), 'pearson_return_safe': pearson(returns, safe),
            'recall': hits / max(int(safe.sum()), 1),
            'precision': hits / max(int(predicted.sum()), 1),
            'accuracy': float((predicted == safe).mean()), 'threshold': threshold,
            'z_mean_safe': float(np.mean(z[safe])) if safe.any() else float('nan'),
            'z_mean_unsafe': float(np.mean(z[~safe])) if (~safe).any() else float('nan')}


def split_members(split_file, labelled) -> np.ndarray:
    """Return the source trajectory indices a split-demos file holds, checking its source."""
    import h5py
    from saferl_ros.files import sha256_file

    with h5py.File(split_file, 'r') as h5:
        if 'source_trajectories' not in h5.attrs or 'split_source' not in h5.attrs:
            raise ConfigError(f'{split_file} is not a file of saferl-data split-demos (no '
                              'source_trajectories attribute); give one for --only')
        members = np.asarray(json.loads(h5.attrs['source_trajectories']), dtype=np.int64)
        source = json.loads(h5.attrs['split_source'])
    if source.get('sha256') != sha256_file(labelled):
        raise ConfigError(f'{split_file} was split from {source.get("path")}, not from '
                          f'{labelled} (sha256 differs); give its source file')
    return members


def evaluate_run(run_dir, labelled, kappa: float, only=None) -> dict:
    """Return the quality of a DSPO run's discriminator on a labelled dataset file."""
    from offline_training.algos import dspo
    from offline_training.runs import open_run

    run = open_run(run_dir)
    if run.module is not dspo:
        raise ConfigError(f'{run_dir} is a {run.algorithm} run; give a DSPO run folder')
    data = load_dataset(labelled, task=run.task)
    _, cost_returns, _, _ = trajectory_returns(data)
    if np.isnan(cost_returns).any():
        raise ConfigError(f'{labelled} has no cost labels; give a labelled dataset (the source, '
                          'or PREFIX-heldout.hdf5 of split-demos --holdout)')
    z, returns = dspo.safety_signal(run.model, run.config, data)
    safe = cost_returns <= kappa
    if only is not None:
        members = split_members(only, labelled)
        z, returns, safe = z[members], returns[members], safe[members]
    return {'run': str(run_dir), 'dataset': str(labelled), 'only': str(only) if only else None,
            'kappa': float(kappa), **quality(z, returns, safe)}


@reports_user_errors('discriminator_quality', expected=(DatasetError,))
def main(argv=None) -> int:
    """Print (and optionally write) the discriminator quality of a DSPO run."""
    parser = argparse.ArgumentParser(prog='discriminator_quality', description=__doc__.split(
        '\n\n')[0].strip())
    parser.add_argument('run', help='DSPO run folder')
    parser.add_argument('labelled', help='labelled DSRL dataset of the same task')
    parser.add_argument('--kappa', type=float, required=True, help='safe: cost return <= kappa')
    parser.add_argument('--only', metavar='SPLIT.hdf5',
                        help='score only the source trajectories of this split-demos file')
    parser.add_argument('-o', '--output', help='write the figures as JSON')
    args = parser.parse_args(argv)
    report = evaluate_run(args.run, args.labelled, args.kappa, args.only)
    text = json.dumps(report, indent=2)
    print(text)
    if args.output:
        with open(args.output, 'w') as stream:
            stream.write(text + '\n')
    return 0


if __name__ == '__main__':
    sys.exit(main())
