"""ivon_fast: a fused, exact implementation of the IVON optimizer for PyTorch."""
from .optimizer import IVON
from .backends import BACKENDS

__all__ = ["IVON", "BACKENDS"]
__version__ = "0.1.0"
