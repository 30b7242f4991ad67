"""
``--set KEY=VALUE`` arguments of the command-line tools, the value read as YAML.

One parser for saferl-train, saferl-loop, saferl-data, saferl-eval's --monitor-set and
tools/gpu_grid.py; it imports no torch, so a tool that evaluates bundles on ONNX Runtime alone
stays free of it.
"""

import argparse

from saferl_ros.errors import load_yaml, short_repr
import yaml


def parse_override(text: str):
    """Return (key, value) of one ``--set KEY=VALUE`` (VALUE read as YAML)."""
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'--set expects KEY=VALUE, got {short_repr(text)}')
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError as error:
        reason = getattr(error, 'problem', None) or type(error).__name__
        raise argparse.ArgumentTypeError(f'--set {key}: {short_repr(value)} is not a YAML value '
                                         f'({reason})') from None
