"""
Behaviour agents and rollout collection for DSRL-style offline datasets.

``lagrangian``: PID-Lagrangian multiplier and the annealed cost budget. ``behavior``:
PPO-Lagrangian behaviour agents (stable-baselines3) with small, committed checkpoints.
``density``: DSRL's grid filter over (cost return, reward return), seeded. ``collect``: roll
checkpoints out and write a DSRL-format HDF5 dataset. ``train_all``: the resumable training
queue over tasks. ``report``: coverage against the DSRL datasets.
"""
