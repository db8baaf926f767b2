"""flaxcnn: the CIFAR-2 and speech-commands CNN labs in JAX/Flax NNX, proven equal to PyTorch."""

__version__ = "0.1.0"
