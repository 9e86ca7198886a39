"""aemt: AE-MT (autoencoder-based self-supervised learning + MulT) for multimodal sentiment analysis."""

__version__ = "0.1.0"
