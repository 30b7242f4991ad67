#!/usr/bin/env python3
"""
How much of an OASIS generator's output cost comes from where its pinned start states are drawn.

    python tools/oasis_start_states.py GENERATOR.pt SOURCE.hdf5 --task CarCircle
                                       [--starts 1000] [--kappa 20] [-o OUT.json]

A generated window of 17 states cannot leave the region its first (pinned) state is in, so on a
tempting dataset the start states can decide the generated cost more than the cost condition
does. This generates from one saved generator (``saferl-data reshape`` writes it beside its
file) with the start states drawn five ways, each under the task's conditions, and prints the
labelled reward and cost as episode equivalents (mean per-step label x the task's horizon):

- ``data``: any state of SOURCE (the official code's, ``--start-states data``);
- ``training``: the first states of windows drawn as the generator's training windows are
  (trajectory weight max(70 - C, 0); ``--start-states training``);
- ``safe trajectories``: any state of a trajectory with cost return <= kappa;
- ``cost-free steps``: any state whose own step had cost 0;
- ``episode starts``: the first state of every trajectory.

SOURCE is the data the generator trained on (the tempting file for the OASIS grid's).
"""

import argparse
from dataclasses import replace
import json
from pathlib import Path
import sys

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def state_sets(data, kappa: float):
    """
    Yield (name, data to draw from, OASISConfig.start_states) for each way of drawing.

    Every way but 'training' draws uniformly ('data') from a subset of the observations;
    the subset is None when the data have no such states.
    """
    from offline_training.data.trajectories import trajectory_returns

    _, costs, starts, stops = trajectory_returns(data)
    obs = np.asarray(data['observations'], dtype=np.float32)
    safe = [np.arange(a, b) for a, b, c in zip(starts, stops, costs) if c <= kappa]
    subsets = {'safe trajectories': obs[np.concatenate(safe)] if safe else None,
               'cost-free steps': obs[np.asarray(data['costs']).reshape(-1) == 0],
               'episode starts': obs[starts]}
    yield 'data', data, 'data'
    yield 'training', data, 'training'
    for name, states in subsets.items():
        has = states is not None and len(states) > 0
        yield name, ({'observations': states} if has else None), 'data'


def main(argv=None) -> int:
    """Generate from each start-state set; print and optionally save the returns."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('generator', type=Path)
    parser.add_argument('source', type=Path)
    parser.add_argument('--task', required=True)
    parser.add_argument('--starts', type=int, default=1000, help='start states per condition')
    parser.add_argument('--kappa', type=float, default=20.0)
    parser.add_argument('-o', '--output', type=Path, help='write the figures as JSON')
    args = parser.parse_args(argv)

    import torch

    from offline_training.algos import oasis
    from offline_training.data.dataset import load_dataset
    from saferl_ros.tasks import get_task

    torch.set_num_threads(1)
    task = get_task(args.task)
    model, config, _ = oasis.load_generator(args.generator)
    config = oasis.resolve_generator_config(
        replace(config, num_starts=args.starts, kappa=args.kappa, conditions=None), task)
    data = load_dataset(args.source, task=task.name)
    config = replace(config, conditions=config.conditions or
                     oasis.default_conditions(data, args.kappa))
    print(f'{task.name}: conditions (reward, cost) {list(config.conditions)}; '
          f'episode equivalents over horizon {task.horizon}')
    rows = {}
    for name, source, drawn in state_sets(data, args.kappa):
        if source is None:
            print(f'{name:18s} no such states')
            continue
        _, summary = oasis.generate(model, source, replace(config, start_states=drawn),
                                    config.conditions, seed=0)
        cost = [s['cost_per_step'] * task.horizon for s in summary]
        reward = [s['reward_per_step'] * task.horizon for s in summary]
        rows[name] = {'cost': cost, 'reward': reward}
        print(f'{name:18s} cost ' + ' / '.join(f'{c:5.1f}' for c in cost) +
              '   reward ' + ' / '.join(f'{r:5.0f}' for r in reward), flush=True)
    if args.output is not None:
        args.output.write_text(json.dumps({'task': task.name, 'starts': args.starts,
                                           'conditions': list(config.conditions),
                                           'rows': rows}, indent=1) + '\n')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
