"""The GAN itself: the reference networks, the training step, what DDP ranks agree on, how DDP all-reduces
(`ddp`) and what more workers gain (`scaling`). Imports neither Ray nor boto3."""
