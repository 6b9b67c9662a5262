"""Models: the architecture registry, preprocessing, the checkpoint format, size and speed."""
