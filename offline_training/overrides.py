"""
``--set KEY=VALUE`` arguments of the command-line tools, the value read as YAML.

One parser for saferl-train, saferl-loop, saferl-data, saferl-eval's --monitor-set and
tools/gpu_grid.py; it imports no torch, so a tool that evaluates bundles on ONNX Runtime alone
stays free of it.
"""

import argparse

import yaml


def parse_override(text: str):
    """Return (key, value) of one ``--set KEY=VALUE`` (VALUE read as YAML)."""
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise argparse.ArgumentTypeError(f'--set expects KEY=VALUE, got {text!r}')
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as error:
        reason = getattr(error, 'problem', None) or type(error).__name__
        raise argparse.ArgumentTypeError(f'--set {key}: {value!r} is not a YAML value '
                                         f'({reason})') from None
