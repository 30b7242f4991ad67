"""
What an algorithm module is: the :class:`Algorithm` protocol, and what it exports.

Every module that ``offline_training.algos.ALGORITHMS`` registers implements :class:`Algorithm`
at module level, so training (train.py), export (export.py), evaluation and the tests treat all
algorithms alike and none of them names one. An algorithm describes its own ONNX graphs with an
:class:`ExportPlan`; export.py turns any plan into a verified bundle (docs/bundle.md).
"""

from dataclasses import dataclass, field, is_dataclass
from types import ModuleType
from typing import Any, Dict, List, Mapping, Optional, Protocol, runtime_checkable

import numpy as np
from saferl_ros.bundle import BATCH
import torch
from torch import nn

# Every algorithm has these presets: the paper's values, a configuration that trains on a 2-core
# CPU in about an hour, and tiny networks that train and export in seconds (tests, test bundles).
PRESET_NAMES = ('paper', 'cpu', 'test')


class ExportedMethod(nn.Module):
    """One method of a model as a module's forward: what the ONNX export traces per graph."""

    def __init__(self, model: nn.Module, method: str):
        """Expose ``model.<method>(*inputs)``."""
        super().__init__()
        self.model, self.method = model, method

    def forward(self, *inputs: torch.Tensor):
        """Call the method."""
        return getattr(self.model, self.method)(*inputs)


@dataclass
class GraphSpec:
    """
    One graph to export: a torch module over raw inputs and its declared tensor shapes.

    Shapes use ``'batch'`` for the dynamic batch dimension, exactly as the manifest stores them.
    """

    module: nn.Module
    inputs: Dict[str, list]
    outputs: Dict[str, list]


@dataclass
class ExportPlan:
    """What an algorithm exports: its graphs, the manifest's critic section and normalisation."""

    algorithm: str
    graphs: Dict[str, GraphSpec]
    critic: dict
    obs_mean: Optional[np.ndarray] = None
    obs_std: Optional[np.ndarray] = None
    extra: dict = field(default_factory=dict)  # algorithm details for the manifest (N, T, ...)


def batch_shape(*dims) -> list:
    """Return a manifest shape: the dynamic batch dimension followed by ``dims``."""
    return [BATCH, *[int(d) for d in dims]]


@runtime_checkable
class Trainer(Protocol):
    """Runs training iterations on a model; its state is part of a checkpoint."""

    def update(self, buffer) -> Dict[str, torch.Tensor]:
        """Run one training iteration on batches of ``buffer``; return scalar logs."""

    def state_dict(self) -> dict:
        """Return the optimiser (and schedule, multiplier, ...) state."""

    def load_state_dict(self, state: dict) -> None:
        """Restore the state saved by state_dict()."""


@runtime_checkable
class Algorithm(Protocol):
    """
    The module-level interface of an algorithm (``fisor.py``, ``bc.py``, ``bcq_lag.py``).

    ``CONFIG`` is a dataclass whose defaults are the paper's values; ``PRESETS`` names
    overrides of it and has at least :data:`PRESET_NAMES`.
    """

    NAME: str
    CONFIG: type
    PRESETS: Mapping[str, dict]

    def make_config(self, preset: str = 'paper', **overrides) -> Any:
        """Return the CONFIG of a named preset with ``overrides`` applied."""

    def resolve_config(self, config, task) -> Any:
        """Return ``config`` with its task-dependent values filled in (task: a TaskSpec)."""

    def prepare_arrays(self, data: Mapping[str, np.ndarray], config) -> Dict[str, np.ndarray]:
        """Return the arrays the ReplayBuffer holds (at least 'obs' and 'act')."""

    def build_model(self, obs_dim: int, act_dim: int, config) -> nn.Module:
        """Return a freshly initialised model."""

    def make_trainer(self, model: nn.Module, config) -> Trainer:
        """Return the trainer of ``model``."""

    def export_plan(self, model: nn.Module, config) -> ExportPlan:
        """Return the graphs the bundle holds and the manifest's critic section."""


# Optional module-level hooks, found with getattr by the code named (absent = the default):
#   reads_costs(config) -> bool          False: trains without cost labels (train.py, below)
#   REQUIRES_GENERATED = True            trains only on a generated dataset (OASIS; train.py)
#   milestones(config) -> steps          checkpoints kept as RUN/checkpoints/step_<N>.pt at these
#                                        steps, e.g. DRCORL's end of pretraining (train.py)
#   resume_may_change(config, step)      config fields a run resumed or branched (--init-from)
#     -> set of names                    at ``step`` may change (runs.check_resume)
# and on the trainer: close()            release workers (e.g. a simulator) when training ends.


def reads_costs(module: ModuleType, config) -> bool:
    """
    Return whether training ``module`` with ``config`` reads the dataset's cost labels.

    A module that can learn without them (DSPO, BC-All) defines ``reads_costs(config)``; any
    other is taken to need them, so training refuses a dataset whose costs were removed.
    """
    check = getattr(module, 'reads_costs', None)
    return True if check is None else bool(check(config))


def protocol_problems(module: ModuleType) -> List[str]:
    """Return what ``module`` lacks to be an :class:`Algorithm` (empty when it is one)."""
    problems = []
    if not isinstance(module, Algorithm):
        problems.append('missing ' + ', '.join(
            name for name in ('NAME', 'CONFIG', 'PRESETS', 'make_config', 'resolve_config',
                              'prepare_arrays', 'build_model', 'make_trainer', 'export_plan')
            if not hasattr(module, name)))
        return problems
    if not is_dataclass(module.CONFIG):
        problems.append('CONFIG is not a dataclass')
    missing = [name for name in PRESET_NAMES if name not in module.PRESETS]
    if missing:
        problems.append(f'PRESETS lacks {missing}')
    return problems
