"""
Evaluation during training, as CORL and OSRL do it: every K steps, a short DSRL evaluation.

At each evaluation step the model acts in Bullet-Safety-Gym through the graph the export would
trace (``offline_training.evaluate.ModelAgent``) for a few episodes; the undiscounted reward and
cost returns, normalised the DSRL way at the run's kappa, go to TensorBoard (``eval/...``) and
one row of ``<run>/eval_curve.csv``, and the checkpoint of that step is kept as
``<run>/checkpoints/step_<N>.pt``. ``python -m offline_training.training_curves --eval RUN`` draws
the reward and cost against steps and CPU time.

The evaluation never changes the training: the torch, numpy and Python global generators are
restored afterwards and the episodes draw the policy's noise from their own generator, so a run
with evaluations has the same weights as one without (test/test_train.py checks it).
"""

import csv
from pathlib import Path
import time
from typing import Dict, List, Optional

import numpy as np
from offline_training.runs import keep_checkpoint_copy, kept_checkpoint_path
from saferl_ros.tasks import get_task, normalized_score

CURVE = 'eval_curve.csv'
FIELDS = ('step', 'train_cpu_s', 'train_wall_s', 'episodes', 'reward_mean', 'reward_std',
          'cost_mean', 'cost_std', 'kappa', 'normalized_reward', 'normalized_cost',
          'safe_fraction', 'eval_wall_s')
# Evaluation seed: distinct from the training seed's streams and the same at every evaluation
# point, so the curve compares the policy on the same start states throughout.
EVAL_SEED = 10_000
# A curve has one row per evaluation; a million is far more than any run makes.
MAX_ROWS = 1_000_000
# kappa for algorithms without a cost budget (FISOR's hard constraint): FISOR's Table 1 uses 5.
DEFAULT_KAPPA = 5.0


class PeriodicEvaluator:
    """Evaluate a training run every ``every`` steps for ``episodes`` episodes."""

    def __init__(self, run_dir, algorithm: str, task, config, every: int, episodes: int = 5,
                 keep_checkpoints: bool = True):
        if every < 1 or episodes < 1:
            raise ValueError(f'evaluation every {every} steps with {episodes} episodes: both '
                             'must be >= 1')
        self.run_dir = Path(run_dir)
        self.algorithm, self.spec, self.config = algorithm, get_task(task), config
        self.every, self.episodes = int(every), int(episodes)
        self.keep_checkpoints = keep_checkpoints
        self.kappa = float(getattr(config, 'cost_limit', DEFAULT_KAPPA))
        self.curve = self.run_dir / CURVE

    def due(self, step: int) -> bool:
        """Return whether ``step`` is an evaluation step."""
        return step % self.every == 0

    def resume_at(self, step: int, checkpoint: Optional[Path] = None) -> None:
        """
        Make the curve and the kept checkpoints agree with a run resumed at ``step``.

        Rows past ``step`` go (evaluated, then killed before the checkpoint); if the process was
        killed after the checkpoint of an evaluation step but before its copy was kept, the
        resumed ``checkpoint`` (that very step's) is kept now.
        """
        rows = read_curve(self.run_dir) if self.curve.is_file() else []
        kept = [row for row in rows if row['step'] <= step]
        if len(kept) != len(rows):
            _write_rows(self.curve, kept)
        if checkpoint is not None and any(row['step'] == step for row in kept) and \
                not self._kept(step).is_file():
            self.keep_checkpoint(step, checkpoint)

    def _kept(self, step: int) -> Path:
        return kept_checkpoint_path(self.run_dir, step)

    def __call__(self, step: int, model, writer=None, train_cpu_s: float = 0.0,
                 train_wall_s: float = 0.0) -> Dict[str, float]:
        """Evaluate ``model`` now; log the row to ``writer`` (TensorBoard) and the CSV."""
        import torch

        from offline_training.evaluate import ModelAgent, rollout

        from saferl_ros.sim import seeded_global_rngs

        start = time.time()
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        cuda = [device.index or 0] if device.type == 'cuda' else []
        # Creating a Bullet-Safety-Gym environment draws from numpy's global generator: the whole
        # evaluation runs inside seeded_global_rngs (numpy and Python restored afterwards) and
        # fork_rng (torch's CPU and the model's CUDA generator restored).
        with seeded_global_rngs(EVAL_SEED), torch.random.fork_rng(devices=cuda):
            env = self.spec.make_env()
            try:
                agent = ModelAgent(self.algorithm, model, self.config, self.spec.name)
                rows = [rollout(agent, env, EVAL_SEED, k) for k in range(self.episodes)]
            finally:
                env.close()
                model.train(was_training)
        rewards = np.array([r['reward'] for r in rows])
        costs = np.array([r['cost'] for r in rows])
        r_norm, c_norm = normalized_score(self.spec, rewards, costs, self.kappa)
        row = {'step': int(step), 'train_cpu_s': round(float(train_cpu_s), 3),
               'train_wall_s': round(float(train_wall_s), 3), 'episodes': len(rows),
               'reward_mean': float(rewards.mean()), 'reward_std': float(rewards.std()),
               'cost_mean': float(costs.mean()), 'cost_std': float(costs.std()),
               'kappa': self.kappa, 'normalized_reward': float(np.mean(r_norm)),
               'normalized_cost': float(np.mean(c_norm)),
               'safe_fraction': float(np.mean(c_norm <= 1.0)),
               'eval_wall_s': round(time.time() - start, 3)}
        if writer is not None:
            for key in ('reward_mean', 'cost_mean', 'normalized_reward', 'normalized_cost',
                        'safe_fraction'):
                writer.add_scalar(f'eval/{key}', row[key], step)
        rows_so_far = read_curve(self.run_dir) if self.curve.is_file() else []
        _write_rows(self.curve, [r for r in rows_so_far if r['step'] != step] + [row])
        return row

    def keep_checkpoint(self, step: int, checkpoint: Path) -> Optional[Path]:
        """Copy the checkpoint just written at an evaluation step to checkpoints/step_<N>.pt."""
        if not (self.keep_checkpoints and self.due(step)):
            return None
        return keep_checkpoint_copy(checkpoint, self.run_dir, step)


def read_curve(run_dir) -> List[dict]:
    """
    Return the rows of ``<run_dir>/eval_curve.csv`` as dicts of numbers, in step order.

    Raise ConfigError naming the file, the row and the fix for a file that is not such a curve.
    """
    from saferl_ros.errors import ConfigError

    path = Path(run_dir) / CURVE
    fix = f'delete {path} (the next saferl-train --eval-every K run writes it again)'
    rows = []
    with open(path, newline='', encoding='utf-8', errors='replace') as stream:
        for number, row in enumerate(csv.DictReader(stream), start=2):
            try:
                rows.append({key: (int(row[key]) if key in ('step', 'episodes')
                                   else float(row[key])) for key in FIELDS})
            except (KeyError, TypeError, ValueError):
                raise ConfigError(f'{path}: line {number} is not a row of {", ".join(FIELDS)} '
                                  f'(numbers); {fix}') from None
            if len(rows) > MAX_ROWS:
                raise ConfigError(f'{path}: more than {MAX_ROWS} rows; {fix}')
    return sorted(rows, key=lambda row: row['step'])


def _write_rows(path: Path, rows: List[dict]) -> None:
    from io import StringIO

    from saferl_ros.files import atomic_write_text
    text = StringIO()
    writer = csv.DictWriter(text, fieldnames=FIELDS, lineterminator='\n')
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda row: row['step']))
    atomic_write_text(path, text.getvalue())
