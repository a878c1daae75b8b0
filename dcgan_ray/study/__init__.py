"""Hyperparameter sensitivity studies: `tuner` runs one on Ray Tune; `outcomes` says what became of each
trial; `plots` draws the figures; `report` writes the folder a person opens (index.html, trials.csv,
best.yaml). Only `tuner` imports Ray."""
