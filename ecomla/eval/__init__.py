"""Evaluation: fidelity to the teacher, lm-eval benchmarks, reports."""
