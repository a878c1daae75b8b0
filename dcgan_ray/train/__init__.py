"""Training on Ray Train: the per-rank loop, rank 0's recorder, and the driver that checks and fits."""
