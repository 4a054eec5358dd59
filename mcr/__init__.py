"""mcr: Masked Contrastive Reconstruction pretraining for image-report retrieval."""
__version__ = "0.1.0"
