"""Materialisation: the selected samples copied into new, shuffled pseudo-labeled shards."""
