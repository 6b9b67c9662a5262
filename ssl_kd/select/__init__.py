"""Selection: the top-K images per class (top-P classes per image), de-duplicated."""
