"""Data: chat datasets and their shared train / held-out split, chat rendering, packing, text corpora."""
