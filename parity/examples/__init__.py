"""Worked porting examples: PyTorch networks and their Flax NNX ports (see docs/hand-port.md)."""
