"""dcgan-ray: the DCGAN of Radford et al. (2015) on SVHN, trained across GPUs with Ray, artifacts in S3."""

__version__ = "0.1.0"
