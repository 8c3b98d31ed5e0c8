"""``ivon_fast.IVON``: the public API and the training loop's state machine.

Everything else has a room of its own (docs/DESIGN.md section 10 has the picture); the
arithmetic is the backends' (``reference``, ``triton_backend``, ``cpp_backend``).

Note [the pending sample]: the optimizer is always in one of these states between calls:

    resting, nothing taken      count == 0, pending is None        params hold the mean
    samples folded in           count == k, pending is None        params hold the mean
    one sample pending          count == k, pending == draw d      official loop: params hold the
                                                                   mean, grads hold d's gradient;
                                                                   drop-in: params hold sample d

``count`` is the number of samples of this step already folded into the running averages,
``pending`` the draw whose gradient is not folded in yet. ``sampled_params(train=True)`` folds in
the pending sample, then leaves its own sample pending; ``step()`` updates from the averages and
the pending sample in one fused pass (and, in the drop-in mode, draws the next sample in the same
pass, which becomes pending). A pending sample is folded in as soon as later user code could
clear its gradient: at the block's exit when more samples of this step are expected
(``count + 1 < mc_samples``), and in ``zero_grad()``. Only the last sample of a step stays
pending until ``step()``, so the single-sample loop needs no extra pass and gradient clipping
between the block and ``step()`` applies to it, as with AdamW.

Note [gradient accumulation]: a ``sampled_params(train=True)`` block draws a new sample, so
several blocks per step are several Monte Carlo samples (as in ivon-opt; one beyond
``mc_samples`` warns). Under accelerate's ``accumulate()`` the step after a micro-batch's block is
skipped and the gradient not cleared: the next block then takes the same sample again
(``_accumulating``), so the micro-batches of a step add up to one sample's gradient, as AdamW's
do (with ``mc_samples`` > 1 that is an error naming the pattern that works).

Note [torch.compile]: the optimizer's methods are opaque to Dynamo (``torch.compiler.disable``):
a compiled function that calls ``step()`` or enters ``sampled_params()`` runs them eagerly, with a
graph break, so the draw counters advance exactly as in eager mode. Traced, a ``@no_grad`` step
would drop the counter increments and reuse one sample for ever. ``fullgraph=True`` compilation
of such a function raises Dynamo's error for the disabled call.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import _blocks, _checkpoint, _ivon_opt_export, _messages as messages, _op_loop, _step
from . import _user_writes
from . import posterior as _posterior
from ._checks import check_group_hyperparameters, check_options
from ._draws import Draws
from ._groups import (Betas, check_added_group, new_param_groups, param_names, set_up_added_group,
                      take_over)
from ._layout import FlatLayout
from ._wrappers import disable_dynamo, on_optimizer
from .noise import PhiloxNoise, TorchNoise, initial_seed
from .scalars import StepCount


class IVON(torch.optim.Optimizer):
    """IVON (Shen et al., ICML 2024): variational learning of a diagonal Gaussian posterior.

    Same constructor and training loop as the official ``ivon.IVON`` (ivon-opt 0.1.3), with fused
    kernels behind it. Parameters are moved once, at construction, into flat buffers per
    (param group, device, dtype): every ``p.data`` and ``p.grad`` becomes a view into them.

    Args:
        params: iterable of tensors or of param-group dicts (not empty).
        lr (float): learning rate, >= 0.
        ess (float): effective sample size lambda (usually the training set size), > 0.
        hess_init (float, default 1.0): initial Hessian estimate h0, > 0.
        beta1 (float, default 0.9): momentum coefficient in [0, 1).
        beta2 (float, default 0.99999): Hessian-estimate coefficient in [0, 1].
        weight_decay (float, default 1e-4): prior precision delta, >= 0.
        mc_samples (int, default 1): posterior samples per step, >= 1 (``step(closure)`` takes
            this many; the context-manager loop averages however many it took).
        hess_approx (str, default 'price'): 'price' (reparameterization trick) or 'gradsq'.
        clip_radius (float, default inf): elementwise clip of the preconditioned step, > 0.
        sync (bool, default False): each process is one MC sample: the sample averages are
            all-reduced (and divided by the world size) across the default process group, and
            each rank draws its own noise (key ``noise.rank_seed(seed, rank)``). Not with
            sharded (FSDP2) params, whose ranks hold different elements of one model.
        debias (bool, default True): debias the momentum by 1 - beta1^t.
        rescale_lr (bool, default True): scale lr by hess_init + weight_decay.
        backend (str, default 'auto'): 'auto', 'reference', 'triton', 'cuda' or 'cpu'. 'auto' takes
            the fastest backend available for each device and dtype.
        seed (int or None, default None): 64-bit seed of the noise; None draws one from torch's
            default generator, so ``torch.manual_seed`` controls it.
        rng (str, default 'philox'): 'philox' (counter-based noise shared by every backend) or
            'torch' (``torch.randn`` per group, exactly as ivon-opt; reference backend only).
        resample_on_step (bool, default False): the drop-in mode. Parameters always hold a
            posterior sample; ``loss.backward(); opt.step(); opt.zero_grad()`` trains IVON with one
            MC sample, each step writing the next sample in the same pass as the update.
        skip_nonfinite (bool, default True): a step whose gradients (or sample averages) hold an
            inf or NaN is skipped on the device, without a host synchronization (state and step
            count unchanged, ``skipped_steps`` counts it), for one more read of the gradients;
            False: a non-finite gradient poisons the state for good (docs/DESIGN.md 11).
        capturable (bool, default False): every value that changes from step to step lives on
            the params' device (the draws, the step count, each group's ``lr`` as a 0-dim
            float64 tensor that schedulers ``fill_``), so a whole training step can be captured
            in a CUDA graph and replayed (docs/DESIGN.md 13). Not with ``rng='torch'``.
        prior_mean (default None): the mean of the Gaussian prior (docs/DESIGN.md section 14).
            None: zero (weight decay toward 0, ivon-opt's prior). ``'init'``: the params' values
            at construction (fine-tuning a pretrained model toward where it started). A list of
            tensors shaped like the params, in their order (group by group; a param group's own
            ``prior_mean`` covers its params). Also a param-group option.
        prior_precision (default None): a per-element prior precision, in weight_decay's units
            (the posterior's precision is ess * (hess + prior_precision)), replacing
            weight_decay in every per-element use; None: weight_decay. A list of tensors like
            ``prior_mean``'s, >= 0. An earlier posterior gives both for continual learning:
            ``IVON(params, ..., **posterior.as_prior(ess))``. Also a param-group option. Each
            prior input costs one more read per element and step, only where given.
        state_dtype (torch.dtype, default torch.float32): the dtype of the momentum and Hessian
            state: torch.float32, or torch.bfloat16 (4 bytes per element less, stored by
            unbiased, deterministic stochastic rounding; docs/DESIGN.md section 16). The mean
            stays float32 (the master weights). Every backend implements it, also with
            ``capturable`` and sharded (FSDP2) params; not with float64 params.

    Mixed precision: ``torch.amp.GradScaler`` takes the fused path (``_step_supports_amp_scaling``):
    ``scaler.step(optimizer)`` hands over its scale and inf flag, the kernels divide the gradients
    by the scale and skip an overflowed step on the device (docs/DESIGN.md section 11).

    Behaviour to know:
        * A trainable param whose ``.grad`` is None at a step gets a zero gradient.
        * A param with ``requires_grad=False`` is frozen: never perturbed, never updated. It may
          be unfrozen later; it then starts from its current value.
        * Writes to the params outside the optimizer's blocks, or inside ``mean_params()``,
          become the new mean (Note [user writes to params] in ``_layout``).
        * Evaluation samples (``sampled_params(train=False)``) come from a separate noise stream
          and never shift the training noise.
    """

    _holds_ivon_state = True  # _wrappers.unwrap: an optimizer, not a wrapper around one

    def __init__(self, params, lr: float, ess: float, hess_init: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.99999, weight_decay: float = 1e-4, mc_samples: int = 1,
                 hess_approx: str = "price", clip_radius: float = float("inf"), sync: bool = False,
                 debias: bool = True, rescale_lr: bool = True, *, backend: str = "auto",
                 seed: Optional[int] = None, rng: str = "philox",
                 resample_on_step: bool = False, skip_nonfinite: bool = True,
                 capturable: bool = False, prior_mean=None, prior_precision=None,
                 state_dtype: torch.dtype = torch.float32):
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, clip_radius=clip_radius)
        check_group_hyperparameters(defaults)
        defaults["betas"] = (beta1, beta2)  # Note [betas] in _groups
        options = dict(sync=sync, debias=debias, rescale_lr=rescale_lr,
                       resample_on_step=resample_on_step, skip_nonfinite=skip_nonfinite,
                       capturable=capturable)
        check_options(mc_samples=mc_samples, hess_approx=hess_approx, backend=backend, rng=rng,
                      seed=seed, state_dtype=state_dtype, flags=options)
        # each bucket resolves its backend for its device, dtype and state dtype
        backend_choice = "reference" if rng == "torch" else backend
        param_groups = new_param_groups(params, defaults, backend_choice=backend_choice,
                                        sync=sync, rng=rng, state_dtype=state_dtype,
                                        prior_mean=prior_mean, prior_precision=prior_precision)
        self.__dict__.update(options)
        self.mc_samples, self.hess_approx, self.rng = int(mc_samples), hess_approx, rng
        self.state_dtype = state_dtype
        self.seed = initial_seed(seed, rng, param_groups)
        self._steps = StepCount()  # Note [steps decided on the device] in scalars
        self._draws = Draws()
        self._count, self._pending_draw = 0, None  # Note [the pending sample]
        self._accumulating = False  # Note [gradient accumulation]
        # gradient fingerprints: when a sample was left pending; when a loaded model overwrote
        # the drop-in sample (_user_writes)
        self._pending_grads = self._grads_before_rewrite = None
        self._in_context = self._in_mean = False  # in a block; in mean_params() (params: mean)
        self._params_from_checkpoint = False  # Note [what the params hold] in _checkpoint
        self._live = _op_loop.LiveScalars()
        self._betas = Betas()
        self._layout = FlatLayout(backend_choice, state_dtype)
        self._noise = (TorchNoise(self.seed, sync, self._group_param_lists)
                       if rng == "torch" else PhiloxNoise(self.seed, sync))
        take_over(param_groups, defaults, super().__init__)
        self._live.record(self.param_groups)
        if capturable:
            home = self._layout.buckets[0].device
            self._draws.pin_to_device(home)
            self._steps.pin_to_device(home)
        if resample_on_step:
            self._pending_draw = self._draws.take_train()
            _op_loop.sample(self, self._pending_draw)
        self._layout.grads_at_rest = self._layout.rest_mark()

    def _group_param_lists(self) -> list:
        return [group["params"] for group in self.param_groups]

    # Note [copies]: torch.optim.Optimizer pickles only defaults, state and param_groups; IVON's
    # flat buffers and counters are its state too, so a copy (copy.deepcopy, pickle) takes them
    # all, torch's hooks left out as torch.optim leaves them. A copy gives each param a storage
    # of its own, so the layout makes the copied params alias the copied flat buffers again.
    def __getstate__(self) -> dict:
        return {name: value for name, value in self.__dict__.items()
                if not name.startswith("_optimizer_")}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._layout.state_views_into(self.state)

    @on_optimizer
    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; its params join new flat buckets, existing storage does not move."""
        check_added_group(param_group, self.defaults, backend_choice=self._layout.backend_choice,
                          sync=self.sync, rng=self.rng, state_dtype=self._layout.low_precision)
        super().add_param_group(param_group)
        set_up_added_group(self, self.param_groups[-1])

    # torch.amp.GradScaler.step() sets ``grad_scale`` and ``found_inf`` on the optimizer and calls
    # step() without synchronizing; the kernels unscale and skip (docs/DESIGN.md section 11)
    _step_supports_amp_scaling = True

    @property
    def current_step(self) -> int:
        """Updates taken so far, skipped steps excluded (reading it may wait for the device)."""
        return self._steps.value()

    @current_step.setter
    def current_step(self, value: int) -> None:
        self._steps.set(value, self._steps.skipped())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients (reading it waits for the device)."""
        return self._steps.skipped()

    @property
    def samples_taken(self) -> int:
        """Posterior samples taken toward the next step so far, the pending one included (in the
        drop-in mode the sample the params hold; 0 in the official loop right after a step)."""
        return self._count + (0 if self._pending_draw is None else 1)

    @property
    def backends(self) -> dict:
        """The concrete backend serving each (device, dtype) of the params."""
        return {(str(b.device), b.param_flat.dtype): b.backend for b in self._layout.buckets}

    # ------------------------------------------------------------------ the state machine

    def _write_resting_params(self) -> None:
        """What the params hold between optimizer calls: the mean, or the pending sample."""
        if self.resample_on_step:
            _op_loop.sample(self, self._pending_draw)
        else:
            self._layout.restore()

    def _check_pending_grads(self) -> None:
        """The pending sample's gradient must still be there when it is read."""
        if self._pending_grads is not None and self._layout.grads_dropped(self._pending_grads):
            raise RuntimeError(messages.DROPPED_MESSAGE)

    def _check_not_in_context(self, what: str, mean_allowed: bool = False) -> None:
        if self._in_context and not (mean_allowed and self._in_mean):
            blocks = "sampled_params()" if mean_allowed else "sampled_params() or mean_params()"
            raise RuntimeError(f"IVON.{what} cannot be called inside {blocks}; leave the block "
                               "first")

    def _fold_pending(self) -> None:
        """Fold the pending sample's gradient into the running averages."""
        _op_loop.accumulate(self, self._pending_draw, self._count + 1)
        self._count, self._pending_draw, self._pending_grads = self._count + 1, None, None
        self._accumulating = False

    def _finish_step(self, grads_bound: bool = False) -> None:
        """Average across processes when asked, then update (and resample in drop-in mode):
        the update reads the averages and the pending sample, and its next draw becomes
        pending. ``grads_bound``: the caller has just seen every grad bound to its view."""
        if self.sync and dist.is_available() and dist.is_initialized():
            if self._pending_draw is not None:
                self._fold_pending()
            _op_loop.average_across_ranks(self)
        next_draw = self._draws.take_train(on_device=False) if self.resample_on_step else None
        if self._pending_draw is not None and self._live.changed(self.param_groups):
            self._fold_pending()  # its noise needs the old ess / weight_decay; the update the new
        _op_loop.update(self, self._pending_draw, self._count, next_draw, grads_bound)
        self._count, self._pending_draw, self._pending_grads = 0, next_draw, None
        self._accumulating = False
        self._live.record(self.param_groups)
        self._layout.grads_at_rest = self._layout.rest_mark()

    # ------------------------------------------------------------------ public API

    @on_optimizer
    @contextmanager
    def sampled_params(self, train: bool = False):
        """Put a posterior sample into the params for the duration of the block.

        train=True (the official loop, not with resample_on_step): the gradient computed in the
        block is one MC sample of the next ``step()``. train=False: a sample for prediction, from
        the evaluation noise stream, which never shifts the training noise. On exit the params
        hold what they held before; an exception in the block leaves params and optimizer as they
        were. Writing to the params inside the block is an error (the write would be lost).
        """
        kind, draw = self._enter_sample(train)
        self._in_context = True
        try:
            yield
        except BaseException:
            self._in_context = False
            self._discard_sample(kind, draw)
            raise
        self._in_context = False
        self._exit_sample(kind, draw)

    @disable_dynamo
    @torch.no_grad()
    def _enter_sample(self, train: bool) -> tuple:
        return _blocks.enter_sample(self, train)

    @disable_dynamo
    @torch.no_grad()
    def _exit_sample(self, kind: str, draw: int) -> None:
        _blocks.exit_sample(self, kind, draw)

    @disable_dynamo
    @torch.no_grad()
    def _discard_sample(self, kind: str, draw: int) -> None:
        _blocks.discard_sample(self, kind, draw)

    @on_optimizer
    @contextmanager
    def mean_params(self):
        """Put the posterior mean into the params (for evaluation or saving) for the block.

        On exit the params hold what they held before (the mean, or with resample_on_step the
        current training sample), except that params written inside the block
        (``model.load_state_dict``) take the written values as their new mean.
        """
        self._enter_mean()
        self._in_context = self._in_mean = True
        try:
            yield
        except BaseException:
            self._in_context = self._in_mean = False
            self._exit_mean(adopt_writes=False)
            raise
        self._in_context = self._in_mean = False
        self._exit_mean(adopt_writes=True)

    @disable_dynamo
    @torch.no_grad()
    def _enter_mean(self) -> None:
        self._check_not_in_context("mean_params()")
        _user_writes.prepare(self)
        self._layout.restore()
        self._layout.mark_seen()

    @disable_dynamo
    @torch.no_grad()
    def _exit_mean(self, adopt_writes: bool) -> None:
        if adopt_writes:
            # writes in the block were made to the mean
            _user_writes.prepare(self, params_hold_mean=True)
        else:
            self._layout.forget_writes()
            self._layout.sync_requires_grad()
        self._write_resting_params()
        self._layout.mark_seen()

    @disable_dynamo
    @on_optimizer
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One IVON update from the gradients of the samples taken since the last step.

        With a closure (which should zero the grads, compute the loss and call backward), draws a
        sample for each of the mc_samples closure calls and returns the mean loss (None when the
        closure returns None). A closure that returns None and leaves the gradients untouched
        (PyTorch Lightning passes one after a manual backward) computes no sample: the step then
        uses the samples taken before it, as ``step()`` does. Any failure inside
        ``step(closure)`` leaves params and optimizer as they were.
        """
        try:
            return _step.step(self, closure)
        except BaseException:
            # torch's GradScaler removes the attributes it set only when step() returns; left
            # behind, the next scaler.step() would hand over the scale squared
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    @disable_dynamo
    @on_optimizer
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient in place (grads stay views into the flat buffer).

        ``set_to_none`` is accepted for compatibility and ignored: the gradient storage is part
        of the flat layout, and zeroing it is one memset per bucket. In the official loop, a
        pending sample's gradient is folded into the step's averages first, so clearing
        gradients before the next ``sampled_params`` block never loses a sample.
        """
        if self._in_context and self._accumulating:  # Note [gradient accumulation]
            raise RuntimeError(messages.ZERO_GRAD_MID_ACCUMULATION)
        if self._pending_draw is not None and not self.resample_on_step and not self._in_context:
            with torch.no_grad():
                _user_writes.prepare(self)
                self._fold_pending()
        self._layout.zero_grads()
        self._layout.grads_at_rest = self._layout.rest_mark()

    @disable_dynamo
    @on_optimizer
    def posterior(self, model=None):
        """The posterior so far, an ``ivon_fast.Posterior``: per param (``param_groups`` order)
        a copy of its mean and std (0 if frozen), and its name (from ``model`` when given, else
        ``IVON(model.named_parameters())``'s). Allowed inside ``mean_params()``."""
        self._check_not_in_context("posterior()", mean_allowed=True)
        names = param_names(self.param_groups, model)
        with torch.no_grad():
            _user_writes.prepare(self, params_hold_mean=self._in_mean)
            return _posterior.of_optimizer(self, names)

    @disable_dynamo
    @on_optimizer
    def state_dict(self) -> dict:
        """Everything resuming needs: buffers per param, hyperparameters, counters and seed;
        torch's state-dict hooks (``register_state_dict_pre_hook`` / ``post_hook``) run."""
        # not inside sampled_params(): the params hold a sample the state does not record.
        # Inside mean_params() a model saved beside is the mean (Note [what the params hold]).
        self._check_not_in_context("state_dict()", mean_allowed=True)
        return _checkpoint.save_with_hooks(self)

    @disable_dynamo
    @on_optimizer
    def ivon_opt_state_dict(self) -> dict:
        """The state as ivon-opt's ``ivon.IVON.load_state_dict`` takes it (the model's params
        are its mean: between steps in the official loop, inside ``mean_params()`` in the
        drop-in mode; then set its ``current_step``). Refuses state ivon-opt cannot hold."""
        return _ivon_opt_export.export(self)

    @disable_dynamo
    @on_optimizer
    def load_state_dict(self, state_dict: dict, step: Optional[int] = None) -> None:
        """Load a state dict of this class, or of ivon-opt's ``ivon.IVON`` (it holds no step
        count and no mean: load the model's weights first, then pass ``step=<optimizer steps
        taken>``). torch's load-state-dict hooks run."""
        self._check_not_in_context("load_state_dict()")
        self._layout.check_materialized()
        _checkpoint.load_with_hooks(self, dict(state_dict), step)
