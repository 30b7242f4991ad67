"""
Offline safe-RL algorithms (FISOR, DRCORL, OASIS, DSPO, baselines) sharing one training framework.

Each algorithm module implements :class:`offline_training.algos.protocol.Algorithm`: a dataclass
config ``CONFIG`` with the paper's values as defaults, ``PRESETS`` (paper, cpu, test),
``make_config``, ``resolve_config``, ``prepare_arrays``, ``build_model``, ``make_trainer`` and
``export_plan``. Adding an algorithm is its module and one line of ``ALGORITHMS``.
"""

from importlib import import_module
from types import ModuleType
from typing import Dict, Tuple

from saferl_ros.errors import UnknownNameError

# Algorithm name (as in the model bundle manifest) -> (module, fixed config values).
ALGORITHMS: Dict[str, Tuple[str, dict]] = {
    'fisor': ('offline_training.algos.fisor', {}),
    'bc_all': ('offline_training.algos.bc', {'mode': 'all'}),
    'bc_safe': ('offline_training.algos.bc', {'mode': 'safe'}),
    'bcq_lag': ('offline_training.algos.bcq_lag', {}),
    'drcorl': ('offline_training.algos.drcorl', {}),
    'oasis': ('offline_training.algos.oasis', {}),
    'dspo': ('offline_training.algos.dspo', {}),
}


def get_algorithm(name: str) -> Tuple[ModuleType, dict]:
    """Return (module, fixed config overrides) of an algorithm name such as 'fisor'."""
    key = name.lower().replace('-', '_')
    if key not in ALGORITHMS:
        raise UnknownNameError(f'unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}')
    module_name, fixed = ALGORITHMS[key]
    return import_module(module_name), dict(fixed)
