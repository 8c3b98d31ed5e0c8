"""ivon_fast: a fused, exact implementation of the IVON optimizer for PyTorch."""
from .optimizer import IVON
from .backends import BACKENDS
from ._extension import ExtensionWarning

__all__ = ["IVON", "BACKENDS", "ExtensionWarning"]
__version__ = "0.1.0"
