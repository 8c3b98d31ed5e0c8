"""IVON under the Hugging Face ``transformers.Trainer``.

The drop-in mode (``IVON(..., resample_on_step=True)``) trains through the Trainer's ordinary
loop: its backward, gradient accumulation, gradient clipping (``max_grad_norm``), ``step()`` and
``model.zero_grad()`` are those of AdamW. Its params always hold a posterior sample, though, so
an evaluation or a checkpoint would silently use that sample. ``IVONCallback`` puts the posterior
mean into the params whenever the Trainer is about to evaluate or save, and can average the
evaluation's predictions over posterior samples::

    from ivon_fast import IVON
    from ivon_fast.integrations.hf import IVONCallback

    optimizer = IVON(model.parameters(), lr=0.1, ess=len(train_set), resample_on_step=True)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      optimizers=(optimizer, None), callbacks=[IVONCallback()])
    trainer.train()
    trainer.evaluate()      # at the mean (the callback holds it after training)
    trainer.save_model()    # the mean

The official loop (``resample_on_step=False``: ``mc_samples`` posterior samples of the same batch
per step, each one's gradient computed inside a ``sampled_params(train=True)`` block) needs a
``training_step`` that takes the samples; ``IVONTrainer`` is a ``Trainer`` with that override
(written out in ``docs/hf.md`` for your own Trainer subclass)::

    optimizer = IVON(model.parameters(), lr=0.1, ess=len(train_set), mc_samples=2)
    args = TrainingArguments(..., max_grad_norm=0.0)   # with mc_samples > 1, see below
    trainer = IVONTrainer(model=model, args=args, ..., optimizers=(optimizer, None),
                          callbacks=[IVONCallback()])

Note [when the callback acts]: ``TrainerCallback`` has no "before evaluate / save" event. In
``_run_epoch`` the Trainer calls ``on_step_end`` (or ``on_epoch_end``) and then
``_maybe_log_save_evaluate``, which evaluates when ``control.should_evaluate`` is set and then
saves when ``control.should_save`` is set (``_save_checkpoint``: the model, then the optimizer's
``state_dict()``, the scheduler and the RNG states). ``DefaultFlowCallback`` sets both flags in
its ``on_step_end`` / ``on_epoch_end``, and it runs before every user callback (the Trainer puts
the default callbacks first). So ``IVONCallback.on_step_end`` / ``on_epoch_end`` see the flags
and open an *evaluation phase* when either is set; the phase ends at the next ``on_step_begin``
(which the Trainer calls before the first micro-batch of every optimizer step), ``on_epoch_begin``
or ``on_train_begin``. ``eval_on_start`` opens a phase in ``on_train_begin``. ``on_train_end``
opens one that lasts after training (``mean_after_train``), so ``trainer.evaluate()``,
``trainer.predict()`` and ``trainer.save_model()`` after ``train()`` use the mean too.

During a phase, in the drop-in mode, the optimizer's ``mean_params()`` block is held open (in a
``contextlib.ExitStack``); in the official loop the params hold the mean between steps anyway.
Leaving ``mean_params()`` writes back the exact training sample it replaced, and evaluation
samples come from a separate noise stream, so training after an evaluation or a save is bitwise
what it would have been without them. The checkpoint's optimizer state is saved inside the block
(``IVON.state_dict()`` is allowed there) and records the training sample the params return to;
the model file beside it holds the mean. Resuming from the pair continues exactly.

Note [predictive evaluation]: with ``eval_samples=K`` the model's ``forward`` is wrapped while a
phase is open. A forward in eval mode, without autograd and without a cache (what the Trainer's
``evaluate`` and ``predict`` run) is run K times, each inside ``optimizer.sampled_params()`` (the
evaluation noise stream), and returns the predictive: ``logits = log(mean_k softmax(logits_k))``
(float32; every other output field is the last sample's). When the model also computed a loss
(labels were passed), that loss is recomputed from the predictive log-probabilities with the
model's own loss code: the call the model made to ``self.loss_function`` (transformers' causal
LM, masked LM, classification losses; shifting, ``ignore_index`` and ``num_items_in_batch``
included), or, for models that compute a plain cross-entropy inline, ``cross_entropy`` over the
last dimension. Either is first checked on the first sample: applied to that sample's
log-softmax it must give the loss the model computed itself. Cross-entropy does not change when
its logits are replaced by their log-softmax, so this check passes (up to rounding) for softmax
cross-entropy losses and fails for regression (MSE), multi-label (BCE) or other losses, which
are an error. The Trainer's eval loss is then the predictive NLL, and argmax metrics score the
predictive. Limits: the model must return its logits as ``logits``; ``torch.nn.DataParallel``
(several GPUs in one process) copies the wrapped forward into its replicas and is not supported;
``model.generate()`` (cached forwards) runs at the mean.
"""
from __future__ import annotations

import atexit
import contextlib
import math
import warnings
import weakref
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.utils import logging as hf_logging

from .._wrappers import unwrap

__all__ = ["IVONCallback", "IVONTrainer"]


def _ivon_of(optimizer):
    """The IVON inside the Trainer's optimizer (accelerate wraps it), or a clear error."""
    try:
        return unwrap(optimizer)
    except TypeError as error:
        raise TypeError(
            "IVONCallback needs the Trainer's optimizer to be an ivon_fast.IVON: pass "
            "Trainer(..., optimizers=(IVON(model.parameters(), ..., resample_on_step=True), "
            f"scheduler_or_None)); got {type(optimizer).__name__}") from error


FLAT_PRIOR_WARNING = (
    "IVON's prior precision is each param group's weight_decay, and {count} of the params train "
    "with weight_decay=0.0: a flat prior (no pull toward zero, and their posterior std rests on "
    "the Hessian alone). When the Trainer builds the optimizer (optimizer_cls_and_kwargs), it "
    "sets weight_decay=TrainingArguments.weight_decay (default 0.0) for most params and 0.0 for "
    "biases and norms, whatever IVON's own weight_decay. Build IVON yourself to keep its prior: "
    "Trainer(..., optimizers=(IVON(model.parameters(), lr=..., ess=..., weight_decay=1e-4), "
    "None)), or set TrainingArguments(weight_decay=...) for the decayed params")


def _check_setup(opt, args) -> None:
    """The combinations of IVON and TrainingArguments that cannot train correctly."""
    flat = sum(p.numel() > 0 for group in opt.param_groups if float(group["weight_decay"]) == 0.0
               for p in group["params"] if p.requires_grad)
    if flat:
        warnings.warn(FLAT_PRIOR_WARNING.format(count=flat), UserWarning, stacklevel=3)
    if opt.resample_on_step:
        if opt.mc_samples > 1:
            raise ValueError(
                f"Invalid mc_samples: {opt.mc_samples} with resample_on_step=True; the drop-in "
                "mode trains with one posterior sample per step (mc_samples=1). For several "
                "samples of each batch use the official loop: resample_on_step=False with "
                "ivon_fast.integrations.hf.IVONTrainer")
        return
    if args.gradient_accumulation_steps > 1:
        raise ValueError(
            f"Invalid gradient_accumulation_steps: {args.gradient_accumulation_steps} with IVON's "
            "official loop (resample_on_step=False); each sampled_params(train=True) block's "
            "gradient must be one sample's gradient of the whole batch. Set "
            "gradient_accumulation_steps=1, or use the drop-in mode (resample_on_step=True), "
            "which accumulates as AdamW does")
    if opt.mc_samples > 1 and args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(
            f"Invalid max_grad_norm: {args.max_grad_norm} with mc_samples={opt.mc_samples} in "
            "IVON's official loop; the Trainer clips between the last sample and step(), where "
            "only the last sample's gradient is left (the earlier ones are already folded into "
            "the step), so the samples would be clipped unequally. Set max_grad_norm=0, or "
            "mc_samples=1, or use the drop-in mode (resample_on_step=True)")
    if opt.mc_samples > 1 and args.fp16:
        raise ValueError(
            f"Invalid fp16: True with mc_samples={opt.mc_samples} in IVON's official loop; the "
            "Trainer unscales the gradients before step() (to measure their norm), which reaches "
            "only the last sample. Use bf16, or mc_samples=1, or the drop-in mode")


class IVONCallback(TrainerCallback):
    """Evaluations and checkpoints at IVON's posterior mean under ``transformers.Trainer``;
    optionally, predictive averaging over posterior samples in evaluation.

    What it does at each event (Note [when the callback acts] in this module):

    * ``on_train_begin``: ends a phase left open; checks that the optimizer is an
      ``ivon_fast.IVON`` (through accelerate's wrapper) and that the TrainingArguments suit its
      loop (errors name the argument); opens a phase when ``eval_on_start`` is set.
    * ``on_step_end``, ``on_epoch_end``: opens an evaluation phase when
      ``control.should_evaluate`` or ``control.should_save`` is set (the Trainer evaluates and
      saves right after these events).
    * ``on_step_begin``, ``on_epoch_begin``: ends the phase; the params hold the training
      sample again, bit for bit.
    * ``on_pre_optimizer_step``: in the official loop, a clear error when the step took no
      posterior sample (the plain ``Trainer.training_step`` was used instead of ``IVONTrainer``'s).
    * ``on_train_end``: opens a phase that lasts after training (``mean_after_train``).
    * ``on_evaluate``, ``on_save``: warn when an evaluation or a save ran on a posterior sample
      because no phase was open (another callback requested it after this one ran, or
      ``trainer.evaluate()`` was called before ``train()``).

    During a phase, in the drop-in mode, the params hold the posterior mean (the optimizer's
    ``mean_params()`` block is held open); with ``eval_samples > 0`` the model's forward averages
    the predictive (Note [predictive evaluation]). Loading weights into the model
    (``model.load_state_dict``, as the Trainer does when it resumes from a checkpoint or loads the
    best model) ends the phase first, so the optimizer can load its state next; the loaded
    weights then become the optimizer's new mean at its next call. While a phase is open the
    optimizer's own blocks (``sampled_params()``, ``mean_params()``), ``step()`` and
    ``load_state_dict`` refuse to run: call ``release()`` first.

    Args:
        eval_samples (int, default 0): posterior samples averaged per evaluation forward; 0
            evaluates at the mean. May be changed between evaluations (e.g. after training, to
            evaluate both ways).
        mean_after_train (bool, default True): keep the params at the mean after training, so
            that ``trainer.evaluate()``, ``trainer.predict()`` and ``trainer.save_model()`` use
            it; ``release()`` (or the next ``train()``) returns them to the training sample.
    """

    def __init__(self, eval_samples: int = 0, mean_after_train: bool = True):
        if not isinstance(mean_after_train, bool):
            raise ValueError(f"Invalid mean_after_train: {mean_after_train!r}; it must be True or "
                             "False")
        self._eval_samples = _checked_samples(eval_samples)
        self.mean_after_train = mean_after_train
        self._phase = None             # the open evaluation phase, or None
        self._hooked_model = None      # the model whose load_state_dict ends a phase
        self._load_hook = None
        self._in_train = False
        self._warned = False
        self._exit_registered = False

    @property
    def eval_samples(self) -> int:
        """Posterior samples averaged per evaluation forward (0: the mean)."""
        return self._eval_samples

    @eval_samples.setter
    def eval_samples(self, value: int) -> None:
        self._eval_samples = _checked_samples(value)
        if self._phase is not None:  # an open phase follows the new value at once
            self._phase.set_predictive(self._eval_samples)

    def release(self) -> None:
        """End the evaluation phase, if one is open: the params get the training sample back
        (drop-in mode) and the model's forward is unwrapped."""
        phase, self._phase = self._phase, None
        if phase is not None:
            phase.close()

    # ------------------------------------------------------------------ events

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.release()
        self._in_train = True
        opt = _ivon_of(optimizer)
        _check_setup(opt, args)
        if args.eval_on_start:
            self._open(model, opt)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.release()

    def on_step_begin(self, args, state, control, **kwargs):
        self.release()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if control.should_evaluate or control.should_save:
            self._open(model, _ivon_of(optimizer))

    def on_epoch_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if control.should_evaluate or control.should_save:
            self._open(model, _ivon_of(optimizer))

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        opt = _ivon_of(optimizer)
        # the official loop's samples: folded in (count) or the last one pending
        if not opt.resample_on_step and opt.samples_taken == 0:
            raise RuntimeError(
                "IVON with resample_on_step=False (the official loop) took no posterior sample "
                "in this step: the Trainer's plain training_step computes the gradient at the "
                "mean. Use ivon_fast.integrations.hf.IVONTrainer (its training_step takes "
                "mc_samples samples in sampled_params(train=True) blocks), or build the "
                "optimizer with resample_on_step=True")

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self._in_train = False
        if self.mean_after_train:
            self._open(model, _ivon_of(optimizer))

    def on_evaluate(self, args, state, control, optimizer=None, **kwargs):
        self._warn_if_sample("evaluation", optimizer)

    def on_save(self, args, state, control, optimizer=None, **kwargs):
        self._warn_if_sample("checkpoint", optimizer)

    # ------------------------------------------------------------------ helpers

    def _open(self, model, opt) -> None:
        if self._phase is not None:
            if self._phase.model is model and self._phase.optimizer is opt:
                return
            self.release()  # the Trainer built a new model or optimizer (model_init)
        if model is not self._hooked_model:
            if self._load_hook is not None:
                self._load_hook.remove()
            self._load_hook = model.register_load_state_dict_pre_hook(_ReleaseOnLoad(self))
            self._hooked_model = model
        self._phase = _Phase(model, opt, self._eval_samples)
        if not self._exit_registered:
            # a phase still open when Python exits would be closed by the garbage collector
            # while modules are torn down; close it while the interpreter still works
            atexit.register(_release_at_exit, weakref.ref(self))
            self._exit_registered = True

    def _warn_if_sample(self, what: str, optimizer) -> None:
        if self._phase is not None or self._warned or optimizer is None:
            return
        try:
            opt = unwrap(optimizer)
        except TypeError:
            return
        if not opt.resample_on_step:
            return  # the official loop's params hold the mean between steps
        self._warned = True
        where = ("another callback requested it after IVONCallback had run (list IVONCallback "
                 "after it)" if self._in_train else
                 "it ran outside trainer.train() (before training, or after "
                 "IVONCallback.release()); wrap it in `with ivon_fast.mean_params(optimizer):`")
        warnings.warn(f"IVONCallback: this {what} used the optimizer's current posterior sample, "
                      f"not the mean: {where}", RuntimeWarning, stacklevel=2)


class _ReleaseOnLoad:
    """The model's ``load_state_dict`` pre-hook: the Trainer loads the model before the optimizer
    (resuming, or load_best_model_at_end), and IVON.load_state_dict refuses to run inside
    mean_params(), so a load ends the evaluation phase. It stays registered (removing it while
    torch iterates over the hooks would change their dict). It holds the callback weakly, and a
    copy of the model (``copy.deepcopy``, pickle) gets one that does nothing: the copy is in no
    phase, and the callback's phase holds what cannot be copied."""

    def __init__(self, callback=None):
        self._callback = None if callback is None else weakref.ref(callback)

    def __call__(self, *args) -> None:
        callback = None if self._callback is None else self._callback()
        if callback is not None:
            callback.release()

    def __reduce__(self):
        return (_ReleaseOnLoad, ())


def _release_at_exit(reference) -> None:
    callback = reference()
    if callback is not None:
        callback.release()


def _checked_samples(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"Invalid eval_samples: {value!r}; it must be an int >= 0 (0: evaluate "
                         "at the posterior mean, K > 0: average the predictive over K posterior "
                         "samples)")
    return value


class _Phase:
    """An open evaluation phase: the mean held in the params (drop-in mode) and, with
    eval_samples > 0, the model's forward wrapped for predictive averaging."""

    def __init__(self, model, optimizer, eval_samples: int):
        self.model, self.optimizer = model, optimizer
        self._mean = None          # ExitStack holding optimizer.mean_params() open
        self._forward = None       # (had an instance attribute 'forward', its value)
        self._samples = 0
        self.hold_mean()
        self.set_predictive(eval_samples)

    def hold_mean(self) -> None:
        if self.optimizer.resample_on_step and self._mean is None:
            stack = contextlib.ExitStack()
            stack.enter_context(self.optimizer.mean_params())
            self._mean = stack

    def release_mean(self) -> bool:
        """Leave the mean (the training sample comes back); whether it was held."""
        stack, self._mean = self._mean, None
        if stack is None:
            return False
        stack.close()
        return True

    def set_predictive(self, samples: int) -> None:
        self._samples = samples
        if samples > 0 and self._forward is None:
            model = self.model
            # accelerate may have put an instance attribute 'forward' there (mixed precision):
            # wrap whatever model(...) calls now, and put back exactly that on close
            self._forward = ("forward" in vars(model), vars(model).get("forward"))
            original = model.forward

            def forward(*args, **kwargs):
                if self._samples == 0 or not _is_evaluation_forward(model, kwargs):
                    return original(*args, **kwargs)
                held = self.release_mean()  # sampled_params() cannot run inside mean_params()
                try:
                    return _predictive_forward(original, model, self.optimizer, self._samples,
                                               args, kwargs)
                finally:
                    if held:
                        self.hold_mean()

            model.forward = forward
        elif samples == 0:
            self._unwrap_forward()

    def _unwrap_forward(self) -> None:
        saved, self._forward = self._forward, None
        if saved is None:
            return
        had_attribute, value = saved
        if had_attribute:
            self.model.forward = value
        else:
            del self.model.forward

    def close(self) -> None:
        self._unwrap_forward()
        self.release_mean()


def _is_evaluation_forward(model, kwargs) -> bool:
    """What the Trainer's evaluate / predict run: eval mode, no autograd, no generation cache."""
    cached = any(kwargs.get(name) is not None for name in ("cache", "past_key_values"))
    return not model.training and not torch.is_grad_enabled() and not cached \
        and kwargs.get("use_cache") is not True


class _LossRecorder:
    """Records the calls a model makes to ``self.loss_function`` (transformers models), on the
    model and on every transformers model inside it (e.g. a PEFT wrapper's base model)."""

    def __init__(self, model):
        self.calls = []
        self._modules = [m for m in model.modules() if isinstance(m, PreTrainedModel)]
        self._saved = []

    def __enter__(self):
        for module in self._modules:
            # reading it may warn about an unset loss_type, e.g. on a base model (GPT2Model)
            # that never computes a loss: that warning is not the user's business here
            verbosity = hf_logging.get_verbosity()
            hf_logging.set_verbosity_error()
            try:
                original = module.loss_function
            finally:
                hf_logging.set_verbosity(verbosity)

            def record(*args, _original=original, **kwargs):
                loss = _original(*args, **kwargs)
                self.calls.append((_original, args, kwargs))
                return loss

            # transformers' loss_function is a property whose setter stores _loss_function; a
            # model class may also define it as a plain method, shadowed here by an attribute
            is_property = isinstance(getattr(type(module), "loss_function", None), property)
            name = "_loss_function" if is_property else "loss_function"
            self._saved.append((module, name, name in vars(module), vars(module).get(name)))
            module.loss_function = record
        return self

    def __exit__(self, *exc):
        for module, name, had, value in self._saved:
            if had:
                setattr(module, name, value)
            else:
                delattr(module, name)
        self._saved = []
        return False


def _logits_of(output):
    if isinstance(output, Mapping) and output.get("logits") is not None:
        return output["logits"]
    raise TypeError(
        "IVONCallback(eval_samples > 0) needs the model's output to hold its logits under "
        f"'logits' (a transformers ModelOutput or a dict); got {type(output).__name__}. "
        "Evaluate at the mean with eval_samples=0")


def _loss_from_logits(call, logits, labels):
    """The model's loss as a function of its logits (Note [predictive evaluation]), or None."""
    if call is not None:
        function, args, kwargs = call

        def same(value):
            return value is logits or (isinstance(value, torch.Tensor)
                                       and value.shape == logits.shape
                                       and torch.equal(value, logits))

        positions = [i for i, value in enumerate(args) if same(value)]
        names = [name for name, value in kwargs.items() if same(value)]
        if len(positions) + len(names) != 1:
            return None
        if positions:
            return lambda z: function(*args[:positions[0]], z, *args[positions[0] + 1:], **kwargs)
        return lambda z: function(*args, **{**kwargs, names[0]: z})
    if isinstance(labels, torch.Tensor) and not labels.is_floating_point():
        return lambda z: F.cross_entropy(z.reshape(-1, z.shape[-1]),
                                         labels.reshape(-1).to(z.device))
    return None


def _predictive_forward(forward, model, optimizer, samples: int, args, kwargs):
    """K forwards at evaluation samples; the output with the predictive logits and loss."""
    log_sum = None
    loss_function = None
    with _LossRecorder(model) as recorder:
        for index in range(samples):
            with optimizer.sampled_params():  # train=False: the evaluation noise stream
                output = forward(*args, **kwargs)
            logits = _logits_of(output)
            log_probs = logits.float().log_softmax(-1)
            if index == 0:
                loss = output.get("loss")
                if loss is not None:
                    loss_function = _checked_loss(recorder.calls, logits, log_probs, loss,
                                                  kwargs.get("labels"), model)
            log_sum = log_probs if log_sum is None else torch.logaddexp(log_sum, log_probs)
    predictive = log_sum - math.log(samples)
    fields = dict(output)
    fields["logits"] = predictive
    if loss_function is not None:
        fields["loss"] = loss_function(predictive)
    return type(output)(**fields) if type(output) is not dict else fields


def _checked_loss(calls, logits, log_probs, loss, labels, model):
    """The loss function of the model's first sample, checked to be a softmax cross-entropy."""
    call = calls[0] if len(calls) == 1 else None
    function = _loss_from_logits(call, logits, labels) if len(calls) <= 1 else None
    if function is not None:
        again = function(log_probs)
        if torch.allclose(again.float(), loss.float(), rtol=1e-3, atol=1e-5, equal_nan=True):
            return function
    raise ValueError(
        f"IVONCallback(eval_samples > 0): the loss of {type(model).__name__} is not a softmax "
        "cross-entropy of its returned logits (computed through self.loss_function, or inline "
        "over the last dimension), so the predictive NLL cannot be formed from the averaged "
        "probabilities (regression, multi-label and other losses). Evaluate at the mean with "
        "eval_samples=0, or pass the Trainer a compute_loss_func (the model then gets no labels "
        "and the function sees the predictive logits)")


class IVONTrainer(Trainer):
    """A ``transformers.Trainer`` whose ``training_step`` runs IVON's official loop when the
    optimizer has ``resample_on_step=False``: ``mc_samples`` posterior samples of the same batch,
    each one's forward and backward inside ``optimizer.sampled_params(train=True)`` with the
    gradients cleared first, so each block's gradient is one sample's. The returned (logged) loss
    is the samples' mean. With ``resample_on_step=True`` it is the plain Trainer.

    Use it with ``IVONCallback`` and ``gradient_accumulation_steps=1``; with ``mc_samples > 1``
    also ``max_grad_norm=0`` and no fp16 (the callback checks). As a mixin for another Trainer
    subclass: ``class MyTrainer(IVONTrainer, SFTTrainer)`` (its ``training_step`` calls
    ``super().training_step`` for each sample).
    """

    def training_step(self, model, inputs, num_items_in_batch=None):
        opt = _ivon_of(self.optimizer)
        if opt.resample_on_step:
            return super().training_step(model, inputs, num_items_in_batch)
        losses = []
        for _ in range(opt.mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()  # the previous sample's gradient is already folded into the step
                losses.append(super().training_step(model, inputs, num_items_in_batch))
        return torch.stack(losses).mean()
