"""flaxcnn: the CIFAR-2 and speech-commands CNN labs in JAX/Flax NNX, proven equal to PyTorch.

Importing flaxcnn changes nothing in the process. A training script of one's own that wants the
allocator setting the ``flaxcnn`` commands use calls ``flaxcnn.cpu_memory.keep_freed_memory()``
first (see :mod:`flaxcnn.cpu_memory`: a step that page-faults its buffers runs up to 2x slower).
"""

__version__ = "0.1.0"
