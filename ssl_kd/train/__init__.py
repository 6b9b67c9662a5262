"""Training: configs, the one training loop, where it runs (local or Ray Train), losses."""
