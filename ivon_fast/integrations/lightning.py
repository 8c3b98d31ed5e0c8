"""PyTorch Lightning integration: ``IVONCallback``.

IVON trains in Lightning without help, in both of its loops (docs/lightning.md):

* automatic optimization: Lightning hands the optimizer a closure that runs ``training_step``,
  ``zero_grad`` and ``backward``; ``IVON.step(closure)`` draws one posterior sample per closure
  call (``mc_samples`` calls), and in the drop-in mode (``resample_on_step=True``) the params
  already hold the sample;
* manual optimization: ``self.optimizers()`` returns Lightning's ``LightningOptimizer``, on which
  ``sampled_params(train=True)``, ``mean_params()``, ``zero_grad()`` and ``step()`` act on the
  IVON inside (Note [optimizer wrappers] in ``ivon_fast/optimizer.py``).

``IVONCallback`` adds what Lightning cannot know about IVON:

* validation, test and predict run at the posterior mean, and checkpoints hold the mean. In the
  drop-in mode the params hold a posterior sample between steps, so the callback holds the
  optimizer's ``mean_params()`` open from each loop's start hook to its end hook, and writes the
  mean into ``checkpoint['state_dict']``. In the official loop (``resample_on_step=False``) the
  params hold the mean between steps already, so the callback leaves them alone there.
  Evaluation samples nothing, so training after a validation continues bit for bit as without
  it.
* at fit start it refuses configurations that would train something other than IVON without
  failing loudly (Note [precision plugins that run the closure]).

Note [precision plugins that run the closure]: in automatic optimization Lightning's precision
plugin decides who calls the training closure. The default plugins (32-bit, ``bf16-mixed``,
``16-true``, ``bf16-true``, 64-bit) pass it to ``optimizer.step(closure)``, so IVON calls it
inside each sample. The fp16 plugins with a ``GradScaler`` (``MixedPrecision`` and
``FSDPPrecision`` under ``precision='16-mixed'``) and ``DeepSpeedPrecision`` call it themselves
first and then ``scaler.step(optimizer)`` / the engine's step without it (lightning 2.6,
``plugins/precision/amp.py``): the gradient is computed at whatever the params hold. In the
drop-in mode that is a sample, and one sample per step is IVON (``mc_samples=1``); in the official
loop it is the mean, which is not IVON, so the callback raises at fit start. Gradient accumulation
(``accumulate_grad_batches > 1``) is refused likewise: Lightning runs the closure of every batch
but the last outside ``optimizer.step``, which in the official loop is at the mean, and in the
drop-in mode with ``mc_samples > 1`` would sum the batches' gradients across samples.
Manual optimization is not affected: there the user's code takes the samples.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.plugins.precision import DeepSpeedPrecision
from lightning.pytorch.utilities import rank_zero_warn

from ..optimizer import IVON
from .._wrappers import unwrap

_CLOSURE_RUN_BY_PLUGIN = (
    "IVONCallback: the precision plugin {plugin} (precision={precision!r}) runs Lightning's "
    "training closure (training_step and backward) itself before it steps the optimizer, outside "
    "any posterior sample (Note [precision plugins that run the closure] in "
    "ivon_fast/integrations/lightning.py), so {problem}. {fix}")

_ACCUMULATION = (
    "IVONCallback: accumulate_grad_batches={batches} runs the closure of every batch but the last "
    "outside optimizer.step(), so {problem}. {fix}")

_DROP_IN_FIX = ("Build the optimizer with IVON(..., resample_on_step=True) (the drop-in mode, "
                "mc_samples=1){also}, or use manual optimization "
                "(self.automatic_optimization = False) with optimizer.sampled_params(train=True).")


def _ivon_of(optimizer) -> Optional[IVON]:
    """The IVON behind one of the trainer's optimizers, or None for another optimizer."""
    try:
        return unwrap(optimizer)
    except TypeError:
        return None


def _runs_closure_itself(plugin) -> bool:
    """Whether a Lightning precision plugin calls the training closure before stepping the
    optimizer, instead of passing it to ``optimizer.step(closure)``: the plugins with a
    ``GradScaler`` (``precision='16-mixed'``) and DeepSpeed's."""
    return getattr(plugin, "scaler", None) is not None or isinstance(plugin, DeepSpeedPrecision)


class IVONCallback(pl.Callback):
    """Evaluate and checkpoint an IVON-trained LightningModule at the posterior mean.

    Finds every ``ivon_fast.IVON`` among the trainer's optimizers (``configure_optimizers`` may
    return it alone, in a list, or in a dict with a scheduler). With the drop-in mode
    (``resample_on_step=True``), whose params hold a posterior sample between steps, it puts the
    posterior mean into the params for validation, test and predict (the optimizer's
    ``mean_params()``, held open from each loop's start hook to its end hook) and writes the mean
    into the checkpoints' ``state_dict``. With the official loop the params hold the mean between
    steps already, and the callback leaves them alone. For ``trainer.validate / test / predict``
    with a Trainer that did not fit the model, the callback uses the IVON of its last fit, when
    that optimizer's params are the module's.

    At fit start, in automatic optimization, it raises a ``RuntimeError`` for configurations in
    which Lightning computes gradients outside IVON's posterior samples: the official loop
    (``resample_on_step=False``) under a precision plugin that runs the closure itself
    (``precision='16-mixed'``, DeepSpeed), the drop-in mode with ``mc_samples > 1`` there, and
    ``accumulate_grad_batches > 1`` unless drop-in with ``mc_samples=1``. Each message names the
    fix.

    Args:
        evaluate_at_mean (bool, default True): validation, test and predict run at the posterior
            mean. False: they run at whatever the params hold (a posterior sample in the drop-in
            mode). For predictions averaged over posterior samples see
            ``ivon_fast.predictive.predict``.
        checkpoint_mean (bool, default True): checkpoints hold the posterior mean in
            ``state_dict``. The optimizer's state in the checkpoint records what the params held,
            so resuming from such a checkpoint continues exactly. Lightning calls callbacks'
            ``on_save_checkpoint`` only for full checkpoints: files of
            ``ModelCheckpoint(save_weights_only=True)`` hold what the params held (the callback
            warns at fit start in the drop-in mode).
    """

    def __init__(self, evaluate_at_mean: bool = True, checkpoint_mean: bool = True):
        for name, value in (("evaluate_at_mean", evaluate_at_mean),
                            ("checkpoint_mean", checkpoint_mean)):
            if not isinstance(value, bool):
                raise ValueError(f"Invalid {name}: expected True or False, got {value!r}")
        self.evaluate_at_mean = evaluate_at_mean
        self.checkpoint_mean = checkpoint_mean
        self._fitted: list = []  # the IVONs of the last fit
        self._mean_stack: Optional[contextlib.ExitStack] = None  # open between start and end

    # ------------------------------------------------------------------ finding the optimizers

    def _optimizers(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> list:
        """The IVONs training ``pl_module``: the trainer's, else those of the last fit."""
        found = [ivon for ivon in map(_ivon_of, trainer.optimizers) if ivon is not None]
        if found:
            return found
        owned = {id(p) for p in pl_module.parameters()}
        return [ivon for ivon in self._fitted
                if all(id(p) in owned for group in ivon.param_groups for p in group["params"])]

    def _drop_in(self, trainer, pl_module) -> list:
        """The IVONs whose params hold a posterior sample between steps."""
        return [ivon for ivon in self._optimizers(trainer, pl_module) if ivon.resample_on_step]

    # ------------------------------------------------------------------ fit start: checks

    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._fitted = [ivon for ivon in map(_ivon_of, trainer.optimizers) if ivon is not None]
        if not self._fitted:
            rank_zero_warn("IVONCallback found no ivon_fast.IVON among the trainer's optimizers; "
                           "it does nothing")
            return
        if pl_module.automatic_optimization:
            for ivon in self._fitted:
                _check_automatic_optimization(trainer, ivon)
        if self.checkpoint_mean and any(ivon.resample_on_step for ivon in self._fitted):
            for callback in trainer.checkpoint_callbacks:
                if getattr(callback, "save_weights_only", False):
                    rank_zero_warn(
                        "IVONCallback: ModelCheckpoint(save_weights_only=True) saves without "
                        "calling callbacks' on_save_checkpoint, so its files hold the posterior "
                        "sample the params hold in the drop-in mode (resample_on_step=True), not "
                        "the mean; save full checkpoints for the mean")

    # ------------------------------------------------------------------ evaluation at the mean

    def _enter_mean(self, trainer, pl_module) -> None:
        self._exit_mean()  # a loop that ended without its end hook
        if not self.evaluate_at_mean:
            return
        optimizers = self._drop_in(trainer, pl_module)
        if not optimizers:
            return  # the official loop: the params hold the mean already
        stack = contextlib.ExitStack()
        try:
            for ivon in optimizers:
                stack.enter_context(ivon.mean_params())
        except BaseException:
            stack.close()
            raise
        self._mean_stack = stack

    def _exit_mean(self, exception: Optional[BaseException] = None) -> None:
        """Leave ``mean_params()``: the params get back the sample they held. After an
        exception, writes made to the params in the meantime are discarded, as
        ``mean_params()`` does for an exception inside its block."""
        stack, self._mean_stack = self._mean_stack, None
        if stack is None:
            return
        if exception is None:
            stack.close()
        else:
            stack.__exit__(type(exception), exception, exception.__traceback__)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._enter_mean(trainer, pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._exit_mean()

    def on_test_start(self, trainer, pl_module) -> None:
        self._enter_mean(trainer, pl_module)

    def on_test_end(self, trainer, pl_module) -> None:
        self._exit_mean()

    def on_predict_start(self, trainer, pl_module) -> None:
        self._enter_mean(trainer, pl_module)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._exit_mean()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._exit_mean(exception)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._exit_mean()

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Replace the params' entries of ``checkpoint['state_dict']`` by the posterior mean
        (drop-in mode; in the official loop they hold the mean already). Buffers stay."""
        if not self.checkpoint_mean:
            return
        optimizers = self._drop_in(trainer, pl_module)
        state = checkpoint.get("state_dict")
        if not optimizers or state is None:
            return
        param_names = {name for name, _ in pl_module.named_parameters(remove_duplicate=False)}
        with contextlib.ExitStack() as stack:
            if self._mean_stack is None:  # inside validation the params hold the mean already
                for ivon in optimizers:
                    stack.enter_context(ivon.mean_params())
            # the entries are views of the params until the file is written: copy the mean
            for name, value in pl_module.state_dict().items():
                if name in param_names and name in state:
                    state[name] = value.detach().clone()


def _check_automatic_optimization(trainer: "pl.Trainer", ivon: IVON) -> None:
    """Raise for an automatic-optimization setup that computes gradients outside IVON's
    samples (Note [precision plugins that run the closure])."""
    plugin = trainer.precision_plugin
    if _runs_closure_itself(plugin):
        if not ivon.resample_on_step:
            problem = ("IVON's official loop (resample_on_step=False) would get gradients taken "
                       "at the posterior mean")
            fix = _DROP_IN_FIX.format(also=", choose a precision whose plugin passes the "
                                      "closure to optimizer.step (e.g. 'bf16-mixed')")
        elif ivon.mc_samples > 1:
            problem = (f"the drop-in mode cannot take mc_samples={ivon.mc_samples} samples per "
                       "step (it takes each further sample by calling the closure)")
            fix = "Use mc_samples=1, or manual optimization with sampled_params(train=True)."
        else:
            return
        raise RuntimeError(_CLOSURE_RUN_BY_PLUGIN.format(
            plugin=type(plugin).__name__, precision=getattr(plugin, "precision", None),
            problem=problem, fix=fix))
    batches = trainer.accumulate_grad_batches
    if batches > 1 and (not ivon.resample_on_step or ivon.mc_samples > 1):
        if not ivon.resample_on_step:
            problem = ("in IVON's official loop (resample_on_step=False) their gradients would be "
                       "taken at the posterior mean")
            fix = _DROP_IN_FIX.format(also="")
        else:
            problem = (f"with mc_samples={ivon.mc_samples} the batches' gradients would add up "
                       "across different posterior samples")
            fix = ("Use mc_samples=1 with resample_on_step=True, or accumulate_grad_batches=1 "
                   "and a larger batch.")
        raise RuntimeError(_ACCUMULATION.format(batches=batches, problem=problem, fix=fix))


__all__ = ["IVONCallback"]
