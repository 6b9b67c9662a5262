"""ssl_kd: billion-scale semi-supervised image classification with teacher and student models."""

__version__ = "0.1.0"
