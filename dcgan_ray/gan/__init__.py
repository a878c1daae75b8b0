"""The GAN itself: the seed's networks, the training step, what DDP ranks agree on. Imports neither Ray nor boto3."""
