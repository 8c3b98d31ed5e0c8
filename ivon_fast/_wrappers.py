"""What IVON's methods are wrapped in: frameworks' optimizer wrappers, and Dynamo's disable.

Note [optimizer wrappers]: frameworks wrap the optimizer. accelerate's ``AcceleratedOptimizer``
holds it as ``.optimizer`` (the package-level ``ivon_fast.mean_params(opt)`` and friends unwrap
it); Lightning's ``LightningOptimizer`` is an instance of a subclass of the optimizer's class that
forwards missing attributes to the optimizer, so ``self.optimizers().sampled_params(train=True)``
runs IVON's method with the wrapper as ``self``. Every public method therefore runs on the
optimizer itself (``on_optimizer``): the loop's state has one home, the one ``step()`` uses.
"""
from __future__ import annotations

import functools
import sys

import torch

_EAGER_REASON = ("IVON's optimizer calls run eagerly: they advance the noise draw counters, which "
                 "a traced graph would freeze (Note [torch.compile] in ivon_fast/optimizer.py); "
                 "compile the model or the loss, or let the call break the graph")


def _is_the_optimizer(candidate) -> bool:
    """Whether ``candidate`` is an IVON optimizer that holds its own state (not a wrapper that
    subclasses IVON and forwards to it); IVON marks its class with ``_holds_ivon_state``."""
    return getattr(type(candidate), "_holds_ivon_state", False) and "_layout" in vars(candidate)


def unwrap(optimizer):
    """The IVON inside ``optimizer``: itself, or what wrappers expose as ``.optimizer``."""
    seen, current = [], optimizer
    # a wrapper may also subclass IVON and forward to it (Lightning's LightningOptimizer): the
    # optimizer itself is the instance that holds the state (Note [optimizer wrappers])
    while not _is_the_optimizer(current):
        seen.append(type(current).__name__)
        inner = getattr(current, "optimizer", None)
        if inner is None or inner is current or len(seen) > 16:
            raise TypeError(f"Invalid optimizer: expected an ivon_fast.IVON or a wrapper that "
                            f"exposes one as .optimizer, got {' -> '.join(seen)}")
        current = inner
    return current


def mean_params(optimizer):
    """``unwrap(optimizer).mean_params()``: the posterior mean in the params for a block."""
    return unwrap(optimizer).mean_params()


def sampled_params(optimizer, train: bool = False):
    """``unwrap(optimizer).sampled_params(train)``: a posterior sample in the params."""
    return unwrap(optimizer).sampled_params(train=train)


def on_optimizer(method):
    """Run a public method on the optimizer itself when it is called through a wrapper that
    subclasses it and forwards missing attributes (Lightning's ``LightningOptimizer``, what
    ``self.optimizers()`` returns): with ``self`` the wrapper, the method's writes to the loop's
    state (``self._count = ...``) would land on the wrapper, and the optimizer that ``step()``
    reaches would never see them. Note [optimizer wrappers]."""
    @functools.wraps(method)
    def on_the_optimizer(self, *args, **kwargs):
        if "_layout" not in vars(self):  # a forwarding wrapper: its state lives elsewhere
            self = unwrap(self)
        return method(self, *args, **kwargs)
    return on_the_optimizer


def disable_dynamo(function):
    """``torch.compiler.disable`` with the reason Dynamo shows under ``fullgraph=True`` (Note
    [torch.compile] in ``optimizer``)."""
    try:
        return torch.compiler.disable(function, reason=_EAGER_REASON)
    except TypeError:  # torch before the reason argument
        return torch.compiler.disable(function)


def accelerate_skips_the_step() -> bool:
    """Whether accelerate's gradient accumulation will skip the coming optimizer step: inside
    ``accelerator.accumulate()`` a micro-batch before the last has ``sync_gradients`` False, and
    ``AcceleratedOptimizer.step()`` and ``zero_grad()`` then do nothing. False without
    accelerate (Note [gradient accumulation] in ``optimizer``)."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return False
    return getattr(state.GradientState, "_shared_state", {}).get("sync_gradients", True) is False
