"""Evaluation: sample-quality metrics, speed and memory, plots."""
