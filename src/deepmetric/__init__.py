"""deepmetric: deep metric learning for PyTorch.

Layers (imports point downward only)::

    cli/  ->  training/  ->  evaluation/, synthesis/, memory  ->  losses/, miners/  ->  data/, models/  ->  functional
"""

__version__ = "0.1.0"
