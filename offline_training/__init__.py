"""Offline training workspace: datasets, algorithms, evaluation and model-bundle export."""
