"""Sample quality: the evaluation pipeline, Fréchet statistics, the digit classifier and the FID Inception network."""
