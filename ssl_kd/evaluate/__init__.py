"""Evaluation: accuracy, calibration, fidelity to a teacher, size and speed of a checkpoint."""
