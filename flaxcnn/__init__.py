"""flaxcnn: the CIFAR-2 and speech-commands CNN labs in JAX/Flax NNX, proven equal to PyTorch."""

__version__ = "0.1.0"

from flaxcnn.cpu_memory import keep_freed_memory as _keep_freed_memory

# Before JAX starts its runtime threads: see flaxcnn.cpu_memory (a training step that page-faults
# its buffers on every call runs up to 2x slower on CPU).
_keep_freed_memory()
