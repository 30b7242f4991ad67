"""A dataset on the training device: the replay buffer every trainer samples from, and checks."""

from typing import Dict, Iterable, Mapping

import numpy as np
from saferl_ros.dataset_keys import DSRL_KEYS
from saferl_ros.errors import ConfigError, UnknownNameError
import torch


class ReplayBuffer:
    """
    A dataset held as tensors on one device, sampled in whole batches (no per-item Python).

    ``generator`` (a torch.Generator on the same device) makes the batch indices reproducible
    independently of the other random draws; its state is part of a checkpoint.
    """

    def __init__(self, arrays: Mapping[str, np.ndarray], device: torch.device, seed: int = 0):
        if not arrays:
            raise ValueError('ReplayBuffer needs at least one array')
        sizes = {key: len(value) for key, value in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f'ReplayBuffer arrays have different lengths: {sizes}')
        self.size = next(iter(sizes.values()))
        if self.size == 0:
            raise ConfigError('ReplayBuffer got an empty dataset; give a dataset with '
                              'transitions')
        self.device = torch.device(device)
        self.data = {key: torch.as_tensor(np.asarray(value, dtype=np.float32)).to(self.device)
                     for key, value in arrays.items()}
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)

    def sample_indices(self, batch_size: int) -> torch.Tensor:
        """Return ``batch_size`` uniform indices (with replacement)."""
        return torch.randint(0, self.size, (batch_size,), device=self.device,
                             generator=self.generator)

    def sample(self, batch_size: int) -> Dict[str, torch.Tensor]:
        """Return a dict of [batch_size, ...] tensors drawn uniformly with replacement."""
        idx = self.sample_indices(batch_size)
        return {key: value.index_select(0, idx) for key, value in self.data.items()}

    def state_dict(self) -> dict:
        """Return the sampler state (the data itself is rebuilt from the dataset)."""
        return {'generator': self.generator.get_state(), 'size': self.size}

    def load_state_dict(self, state: dict) -> None:
        """Restore the sampler state saved by state_dict()."""
        if state['size'] != self.size:
            raise ConfigError(f'checkpoint was trained on {state["size"]} transitions but the '
                              f'dataset has {self.size}; resume with the same dataset')
        self.generator.set_state(state['generator'].cpu())


def check_dataset(data: Mapping[str, np.ndarray], keys: Iterable[str] = DSRL_KEYS) -> int:
    """Check that ``data`` has the DSRL keys with one row per transition; return the size."""
    missing = [key for key in keys if key not in data]
    if missing:
        raise UnknownNameError(f'dataset is missing {missing}; expected the DSRL keys '
                               f'{list(keys)} (load it with '
                               'offline_training.data.dataset.load_dataset)')
    sizes = {key: len(data[key]) for key in keys}
    if len(set(sizes.values())) != 1:
        raise ConfigError(f'dataset arrays differ in length: {sizes}')
    return next(iter(sizes.values()))


def clip_actions(actions: np.ndarray, limit: float = 1.0 - 1e-5) -> np.ndarray:
    """Clip dataset actions into the open interval (-1, 1), as FISOR's loader does."""
    return np.clip(np.asarray(actions, dtype=np.float32), -limit, limit)
