"""ivon_fast: a fused, exact implementation of the IVON optimizer for PyTorch."""
from .optimizer import IVON
from .backends import BACKENDS
from ._extension import ExtensionWarning
from ._wrappers import mean_params, sampled_params, unwrap
from .posterior import Posterior, merge
from . import predictive

__all__ = ["IVON", "BACKENDS", "ExtensionWarning", "Posterior", "merge", "mean_params",
           "sampled_params", "unwrap", "predictive"]
__version__ = "0.1.0"
