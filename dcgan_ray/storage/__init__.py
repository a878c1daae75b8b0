"""Object storage and what lives in it: the S3 interface, the bucket layout, checkpoints, run manifests, images."""
