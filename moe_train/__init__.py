"""moe_train: pretraining Mixture-of-Experts language models on PyTorch."""

__version__ = "0.1.0"
