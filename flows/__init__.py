"""Prefect flows: the order of the stages, and nothing else."""

from flows.noisy_student import noisy_student

__all__ = ["noisy_student"]
