#!/usr/bin/env python3
"""
Where a trained DRCORL run's cost estimate C_hat comes from, against the policy's true cost.

    python tools/drcorl_cost_estimate.py RUN [--checkpoint CKPT] [--episodes 5] [--states 20000]
                                         [-o OUT.json]

The adaptation rule (docs/algorithms.md "DRCORL") compares
C_hat = (1 - gamma) T mean_s Q_c^UCB(s, pi(s)) / kappa with 1. This reports C_hat with the
states taken three ways, with and without the ensemble's +k std, beside the normalised cost the
policy really has in the simulator:

- ``dataset``: random states of the run's training dataset (what training averages over);
- ``initial``: the dataset's first state of every episode;
- ``policy``: the states the policy itself visits in ``--episodes`` simulator episodes.

If C_hat on the policy's own states is far above its true cost, the critic over-estimates (the
state distribution is not the cause); if only the dataset average is high, the states are.

``dataset_q_c`` compares the critics with the data themselves: the target ensemble's mean Q_c at
the sampled dataset (s, a) beside the dataset's discounted cost-to-go from the same rows (to the
episode's end, where training's TD stops too). At the end of pretraining (``--checkpoint
RUN/checkpoints/step_<N>.pt``) the critics evaluate the behaviour policy, so they should equal it
up to the upward bias of the pessimistic target (Eq. 18: lambda max + (1 - lambda) min over the
ensemble at every bootstrap); later they evaluate the policy, so on the data's actions followed
by the policy they may be lower where the policy is safer.
Episodes are seeded episode_seed(8, k), apart from evaluation's seed 0.
"""

import argparse
import json
from pathlib import Path
import sys

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DIAGNOSTIC_SEED = 8


def discounted_cost_to_go(costs, starts, ends, gamma: float) -> np.ndarray:
    """Return sum_k gamma^k c_{t+k} for every row t, each sum stopping at its episode's end."""
    to_go = np.zeros(len(costs))
    for start, end in zip(starts, ends):
        running = 0.0
        for row in range(end - 1, start - 1, -1):
            running = costs[row] + gamma * running
            to_go[row] = running
    return to_go


def estimates(model, config, obs) -> dict:
    """Return C_hat over ``obs`` with the UCB (mean + k std) and with the ensemble mean alone."""
    import torch

    from offline_training.algos.drcorl import normalized_cost_estimate

    def c_hat(q):        # the estimate training computes (DRCORL's own function)
        return float(normalized_cost_estimate(q, config.gamma, config.episode_len,
                                              config.cost_limit))
    with torch.no_grad():
        obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32))
        act = model.act(obs_t)
        mean, std = model.cost_mean_std(obs_t, act)
        return {'states': int(len(obs)), 'c_hat_ucb': c_hat(model.cost_ucb(obs_t, act)),
                'c_hat_mean': c_hat(mean), 'q_c_std': float(std.mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0].strip())
    parser.add_argument('run', help='a saferl-train DRCORL run folder')
    parser.add_argument('--checkpoint', default=None,
                        help="the run's weights from this checkpoint (e.g. the kept "
                             'RUN/checkpoints/step_<N>.pt) instead of its last')
    parser.add_argument('--episodes', type=int, default=5)
    parser.add_argument('--states', type=int, default=20_000,
                        help='dataset states sampled for the "dataset" estimate')
    parser.add_argument('-o', '--out', default=None, help='write the figures as JSON here')
    args = parser.parse_args(argv)

    import torch

    from offline_training.algos.batching import clip_actions
    from offline_training.data.dataset import load_dataset
    from offline_training.data.trajectories import episode_spans
    from offline_training.runs import open_run
    from saferl_ros.sim import episode_seed, run_episode
    from saferl_ros.tasks import get_task
    torch.set_num_threads(1)

    run = open_run(args.run, checkpoint=args.checkpoint)
    if run.algorithm != 'drcorl':
        parser.error(f'{args.run} is a {run.algorithm} run; this tool reads DRCORL runs')
    model, config, spec = run.model, run.config, get_task(run.task)
    data = load_dataset(run.run_config['dataset']['path'])
    obs = np.asarray(data['observations'], dtype=np.float32)
    starts, ends = episode_spans(data)
    pick = np.random.default_rng(0).choice(len(obs), min(args.states, len(obs)), replace=False)
    costs = np.asarray(data['costs'], dtype=np.float64)
    data_costs = np.array([costs[s:e].sum() for s, e in zip(starts, ends)])
    to_go = discounted_cost_to_go(costs, starts, ends, config.gamma)
    with torch.no_grad():
        q_data = model.q_c_target(torch.as_tensor(obs[pick]), torch.as_tensor(
            clip_actions(data['actions'])[pick])).mean(dim=0)   # as training feeds them

    env = spec.make_env()
    visited, episode_costs = [], []
    try:
        for k in range(args.episodes):
            states = []

            def act(observation):
                states.append(np.asarray(observation, dtype=np.float32))
                with torch.no_grad():
                    return model.act(torch.as_tensor(states[-1])[None])[0].numpy()
            episode_costs.append(run_episode(env, act, episode_seed(DIAGNOSTIC_SEED, k)).cost)
            visited.append(np.stack(states))
    finally:
        env.close()
    report = {
        'run': str(args.run), 'checkpoint_step': run.run_config['checkpoint_step'],
        'task': spec.name, 'kappa': config.cost_limit,
        'horizon_T': config.episode_len, 'gamma': config.gamma, 'ucb_k': config.ucb_k,
        'cost_pessimism': config.cost_pessimism,
        'dataset': estimates(model, config, obs[pick]),
        'initial': estimates(model, config, obs[starts]),
        'policy': estimates(model, config, np.concatenate(visited)),
        'dataset_q_c': {'rows': int(len(pick)), 'q_c_mean': float(q_data.mean()),
                        'discounted_cost_to_go': float(to_go[pick].mean())},
        'policy_true_normalized_cost': float(np.mean(episode_costs)) / config.cost_limit,
        'policy_episodes': args.episodes,
        'dataset_episode_cost_mean': float(data_costs.mean()),
        'dataset_safe_share': float(np.mean(data_costs <= config.cost_limit)),
    }
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + '\n')
    print(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
