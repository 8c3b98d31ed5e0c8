"""``ivon_fast.IVON``: the IVON optimizer over flat parameter buckets.

The pieces, one module each: the flat layout and what user code does to the params
(``_layout``), where the noise comes from (``noise``), the per-group scalars of an update
(``scalars``), state dicts (``_checkpoint``), argument checks (``_checks``); the arithmetic is the
backends' (``reference``, ``triton_backend``, ``cpp_backend``: the op contract in ``reference``).
This module is the training loop's state machine.

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

Note [optimizer wrappers]: frameworks wrap the optimizer. accelerate's ``AcceleratedOptimizer``
holds it as ``.optimizer`` (the package-level ``ivon_fast.mean_params(opt)`` and friends unwrap
it); Lightning's ``LightningOptimizer`` is an instance of a subclass of the optimizer's class that
forwards missing attributes to the optimizer, so ``self.optimizers().sampled_params(train=True)``
runs IVON's method with the wrapper as ``self``. Every public method therefore runs on the
optimizer itself (``_on_optimizer``): the loop's state has one home, the one ``step()`` uses.

Note [betas]: LR schedulers that cycle momentum (``OneCycleLR``, ``CyclicLR`` with
``cycle_momentum=True``) look for ``betas`` in the param groups, as AdamW has them. Every group
carries ``betas == (beta1, beta2)`` beside the official names. At each step the two are
reconciled: whichever was written since the last step wins (a scheduler writes ``betas``, user
code may write ``beta1``); both written to different values is an error.

Note [torch.compile]: the optimizer's methods are opaque to Dynamo (``torch.compiler.disable``):
a compiled function that calls ``step()`` or enters ``sampled_params()`` runs them eagerly, with a
graph break, so the draw counters advance exactly as in eager mode. Traced, a ``@no_grad`` step
would drop the counter increments and reuse one sample for ever. ``fullgraph=True`` compilation
of such a function raises Dynamo's error for the disabled call.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import _checkpoint, _sharded, backends
from . import posterior as _posterior
from ._checks import (check_group_hyperparameters, check_options, check_params, check_prior,
                      check_state_dtype)
from ._layout import PRIOR_STATE, FlatLayout, Segment
from .noise import EVAL_DRAW_BASE, PhiloxNoise, TorchNoise
from .scalars import StepCount, StepScalars, to_device

_NO_SAMPLE_MESSAGE = (
    "IVON.step() was called without a gradient from a posterior sample. IVON has two training "
    "loops:\n"
    "  1. the official loop (resample_on_step=False):\n"
    "         for _ in range(mc_samples):\n"
    "             with optimizer.sampled_params(train=True):\n"
    "                 optimizer.zero_grad(); loss_fn(model(x), y).backward()\n"
    "         optimizer.step()\n"
    "  2. the AdamW-style drop-in loop, with IVON(..., resample_on_step=True):\n"
    "         loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()\n"
    "or pass a closure: optimizer.step(closure) draws one sample per closure call.")

_CLEARED_MESSAGE = (
    "the gradient of the last posterior sample changed before it was used: a sample beyond "
    "mc_samples={mc} was taken after the gradients were cleared or modified (zero_grad on the "
    "model, or an assignment to .grad) between two sampled_params(train=True) blocks. Set "
    "mc_samples to the number of samples you take per step, or clear gradients inside the block "
    "or with optimizer.zero_grad().")

_DROPPED_MESSAGE = (
    "the gradient of the last posterior sample was set to None before step(), e.g. by "
    "model.zero_grad() between the sampled_params(train=True) block and step(): the sample "
    "would be lost. Clear gradients inside the block, or with optimizer.zero_grad(), which folds "
    "the sample into the step first.")

_OVERWRITTEN_MESSAGE = (
    "the gradient was computed at weights loaded into the model after "
    "optimizer.load_state_dict() (a model checkpoint that holds the posterior mean, e.g. saved "
    "inside mean_params() by the Hugging Face or Lightning callback), not at the posterior "
    "sample the optimizer's state records for this step. The params hold that sample again "
    "now: call optimizer.zero_grad() and compute the gradient again, and when resuming load "
    "the model's state dict before the optimizer's.")

_UNSCALED_FOLDED_MESSAGE = (
    "GradScaler: scaler.unscale_(optimizer) unscaled only the gradient of the last posterior "
    "sample, but {count} earlier sample(s) of this step were already folded into the step's "
    "averages while still scaled, and the optimizer is not told the scale. With mc_samples > 1 "
    "let scaler.step(optimizer) unscale (do not call scaler.unscale_ before it); the optimizer "
    "then divides every sample by the scale inside its kernels.")

_EAGER_REASON = ("IVON's optimizer calls run eagerly: they advance the noise draw counters, which "
                 "a traced graph would freeze (Note [torch.compile] in ivon_fast/optimizer.py); "
                 "compile the model or the loss, or let the call break the graph")


def _on_optimizer(method):
    """Run a public method on the optimizer itself when it is called through a wrapper that
    subclasses it and forwards missing attributes (Lightning's ``LightningOptimizer``, what
    ``self.optimizers()`` returns): with ``self`` the wrapper, the method's writes to the loop's
    state (``self._count = ...``) would land on the wrapper, and the optimizer that ``step()``
    reaches would never see them. Note [optimizer wrappers]."""
    @functools.wraps(method)
    def on_optimizer(self, *args, **kwargs):
        if "_layout" not in vars(self):  # a forwarding wrapper: its state lives elsewhere
            self = _posterior.unwrap(self)
        return method(self, *args, **kwargs)
    return on_optimizer


def _disable_dynamo(function):
    """``torch.compiler.disable`` with the reason Dynamo shows under ``fullgraph=True``."""
    try:
        return torch.compiler.disable(function, reason=_EAGER_REASON)
    except TypeError:  # torch before the reason argument
        return torch.compiler.disable(function)


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
            the fastest backend available for each device and dtype that implements
            ``state_dtype``.
        seed (int or None, default None): 64-bit seed of the noise; None draws one from torch's
            default generator, so ``torch.manual_seed`` controls it.
        rng (str, default 'philox'): 'philox' (counter-based noise shared by every backend) or
            'torch' (``torch.randn`` per group, exactly as ivon-opt; reference backend only).
        resample_on_step (bool, default False): the drop-in mode. Parameters always hold a
            posterior sample; ``loss.backward(); opt.step(); opt.zero_grad()`` trains IVON with one
            MC sample, each step writing the next sample in the same pass as the update.
        skip_nonfinite (bool, default True): a step whose gradients (or sample averages) hold an
            inf or NaN is skipped on the device, without a host synchronization: mean, momentum,
            Hessian and step count keep their values, the step's samples are discarded, and
            ``skipped_steps`` counts it. The check reads the gradients once more (4 bytes per
            fp32 element against the step's 32); False skips it, and a non-finite gradient then
            poisons the state for good.
        capturable (bool, default False): every value that changes from step to step lives on
            the params' device, so a whole training step (forward, backward, ``step()``; or the
            official loop's ``sampled_params(train=True)`` blocks and ``step()``) can be captured
            once in a CUDA graph and replayed: the training draw numbers (an int64 tensor the
            kernels read), the step count and debias factor, and each group's ``lr``, which
            becomes a 0-dim float64 tensor on the params' device (an lr given as a tensor is
            kept when it is on that device), so LR schedulers update it in place (``fill_``)
            between replays. Not with ``rng='torch'``.
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
            stochastic rounding from the noise's Philox stream at draws of their own, so the
            rounding is unbiased and deterministic; docs/DESIGN.md section 16). The mean stays
            float32 (the master weights). It runs on the backends that implement it
            (``ivon_fast.backends.STATE_DTYPES``; so far the reference): ``backend='auto'``
            picks the fastest of them per device and dtype, an explicit backend without it is a
            ValueError. It works with ``capturable`` (the rounding's random bits then follow the
            device's draw counter, fresh at every replay) and with sharded (FSDP2 DTensor)
            params (the bits are indexed by the unsharded model's elements, so the ranks round
            as one unsharded run would; state dicts hold bf16 DTensors). Not with float64
            params, whose state is float64.

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
        defaults["betas"] = (beta1, beta2)  # Note [betas]
        check_options(mc_samples=mc_samples, hess_approx=hess_approx, backend=backend, rng=rng,
                      seed=seed, flags=dict(sync=sync, debias=debias, rescale_lr=rescale_lr,
                                            resample_on_step=resample_on_step,
                                            skip_nonfinite=skip_nonfinite,
                                            capturable=capturable))
        check_state_dtype(state_dtype)
        if capturable and rng == "torch":
            raise ValueError("Invalid capturable: True with rng='torch'; torch.randn noise is "
                             "drawn on the host per step and cannot be replayed by a CUDA graph "
                             "(use the default rng='philox')")
        param_groups = [params] if isinstance(params, torch.Tensor) else list(params)
        if not param_groups or not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        # materialize each group's params once: they may be generators such as module.parameters()
        param_groups = [{**group, "params": _param_list(group["params"])}
                        for group in param_groups]
        if not any(group["params"] for group in param_groups):
            raise ValueError("Invalid params: IVON got an empty parameter list (a generator such "
                             "as model.parameters() can only be iterated once)")
        # each bucket resolves its backend for its device, dtype and state dtype: 'auto' takes
        # the fastest that implements state_dtype (backends.STATE_DTYPES)
        backend_choice = "reference" if rng == "torch" else backend
        for group in param_groups:
            check_group_hyperparameters(group)
            check_params(group["params"], backend_choice, sync=sync, rng=rng,
                         state_dtype=state_dtype)
        for name, value in (("prior_mean", prior_mean), ("prior_precision", prior_precision)):
            defaults[name] = _split_prior(name, value, param_groups)
        for group in param_groups:
            for name in PRIOR_STATE:
                check_prior(name, group.get(name, defaults[name]), group["params"])

        self.mc_samples = int(mc_samples)
        self.hess_approx = hess_approx
        self.sync = sync
        self.debias = debias
        self.rescale_lr = rescale_lr
        self.rng = rng
        self.resample_on_step = resample_on_step
        self.skip_nonfinite = skip_nonfinite
        self.capturable = capturable
        # capturable: [last training draw taken, next one] on the device (Note [capturable steps])
        self._device_draws: Optional[torch.Tensor] = None
        if seed is None:
            # under rng='torch' the seed only drives evaluation noise; drawing it would consume
            # torch's generator and shift the training noise away from ivon-opt's
            seed = torch.initial_seed() if rng == "torch" else int(torch.randint(0, 2**63 - 1, ()))
            seed = _sharded.common_seed(param_groups, seed)  # FSDP: one model, one key
        self.seed = seed
        self._steps = StepCount()  # Note [steps decided on the device] in scalars
        self._next_train_draw = 0
        self._next_eval_draw = 0
        self._count = 0              # Note [the pending sample]
        self._pending_draw = None
        self._pending_grads = None   # gradient fingerprint when a sample was left pending
        # gradient fingerprint when a loaded model overwrote the drop-in sample (_prepare)
        self._grads_before_rewrite = None
        self._in_context = False
        self._in_mean = False        # inside mean_params(): the params hold the mean
        self._params_from_checkpoint = False  # Note [what the params hold] in _checkpoint
        self._live_scalars: list = []  # noise scalars of the live training draw, per group
        self._seen_betas: list = []    # per group, (beta1, beta2) at the last reconciliation
        self.state_dtype = state_dtype
        self._layout = FlatLayout(backend_choice, state_dtype)
        self._noise = (TorchNoise(seed, sync, lambda: [g["params"] for g in self.param_groups])
                       if rng == "torch" else PhiloxNoise(seed, sync))

        # torch validates each group only when adding it (duplicates across groups, non-leaf
        # tensors), after the earlier groups' params moved into their buckets: undo that on failure
        originals = [(p, p.data, p.grad if p.is_leaf else None)
                     for group in param_groups for p in group["params"]]
        try:
            super().__init__(param_groups, defaults)
        except BaseException:
            for param, data, grad in originals:
                param.data = data
                if param.is_leaf:
                    param.grad = grad
            raise
        self._record_live_scalars()
        if capturable:
            home = self._layout.buckets[0].device
            self._device_draws = torch.tensor([-1, 0], dtype=torch.int64, device=home)
            self._steps.pin_to_device(home)
        if resample_on_step:
            self._pending_draw = self._take_train_draw()
            self._sample(self._pending_draw)

    @_on_optimizer
    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; its params join new flat buckets, existing storage does not move."""
        check_group_hyperparameters(param_group)
        _betas_of_new_group(param_group, self.defaults)
        param_group["params"] = _param_list(param_group["params"])
        check_params(param_group["params"], self._layout.backend_choice, sync=self.sync,
                     rng=self.rng, state_dtype=self._layout.low_precision)
        for name in PRIOR_STATE:
            check_prior(name, param_group.get(name, self.defaults.get(name)),
                        param_group["params"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._seen_betas.append((group["beta1"], group["beta2"]))
        if self.capturable:
            group["lr"] = _device_lr_tensor(group["lr"], group["params"])
        new_buckets = self._layout.add_group(len(self.param_groups) - 1, group["params"],
                                             group["hess_init"])
        self._attach_priors(group, new_buckets)
        self._refresh_state_views()
        if self._count > 0:  # mid-step: the new params take part with zero past gradients
            for bucket in new_buckets:
                bucket.ensure_averages()
        if self.resample_on_step and self._pending_draw is not None:
            self._sample(self._pending_draw, buckets=new_buckets)

    @torch.no_grad()
    def _attach_priors(self, group: dict, buckets: list) -> None:
        """The group's prior into its buckets' flat prior state; the group then records only
        what it was ('init' or 'given'; the values are state, saved per param)."""
        position = {id(p): i for i, p in enumerate(group["params"])}
        for name in PRIOR_STATE:
            value = group.get(name)
            if value is None:
                continue
            for bucket in buckets:
                bucket.ensure_prior(name)
                for index, param in enumerate(bucket.params):
                    source = (bucket.shaped(bucket.mean, index) if isinstance(value, str)
                              else value[position[id(param)]].detach())
                    bucket.shaped(getattr(bucket, name), index).copy_(source)
            group[name] = value if isinstance(value, str) else "given"

    # torch.amp.GradScaler.step() sets ``grad_scale`` and ``found_inf`` on the optimizer and calls
    # step() without synchronizing; the kernels unscale and skip (docs/DESIGN.md section 11)
    _step_supports_amp_scaling = True

    @property
    def current_step(self) -> int:
        """Updates taken so far (skipped steps excluded). Once a step was decided on the device
        (the non-finite check, a GradScaler), reading it waits for the device."""
        return self._steps.value()

    @current_step.setter
    def current_step(self, value: int) -> None:
        self._steps.set(value, self._steps.skipped())

    @property
    def skipped_steps(self) -> int:
        """Steps skipped because their gradients were not finite (reading it waits for the
        device)."""
        return self._steps.skipped()

    @property
    def samples_taken(self) -> int:
        """Posterior samples taken toward the next step so far: folded in, plus the pending one
        (in the drop-in mode, the sample the params hold). 0 in the official loop right after
        ``step()``."""
        return self._count + (0 if self._pending_draw is None else 1)

    @property
    def backends(self) -> dict:
        """The concrete backend serving each (device, dtype) of the params."""
        return {(str(b.device), b.param_flat.dtype): b.backend for b in self._layout.buckets}

    # ------------------------------------------------------------------ catching up with user code

    def _refresh_state_views(self) -> None:
        for param, views in self._layout.state_views():
            self.state[param] = views

    def _prepare(self, params_hold_mean: bool = False) -> bool:
        """Catch up with what user code did to the params since the last optimizer call.

        Note [user writes to params] in _layout: the elements that a write changed, compared
        with what the optimizer had put there (the mean rounded to the params' dtype, or the
        pending sample; ``params_hold_mean`` inside ``mean_params()``), become the new mean. The
        other elements keep their exact state: a no-op ``clamp_`` after ``step()`` changes
        nothing, and a bf16 model keeps its fp32 master mean.

        Returns whether user code changed nothing (then every grad is its flat view, too).
        """
        layout = self._layout
        layout.check_materialized()
        if layout.unchanged():  # the common case: one cheap pass (Note [the per-step check])
            self._params_from_checkpoint = False
            return True
        if layout.follow_moves([g["hess_init"] for g in self.param_groups]):
            self._refresh_state_views()
            self._write_resting_params()
            layout.mark_seen()
        layout.sync_requires_grad()
        written = [(b, i) for b, i in layout.written_params() if b.trainable[i]]
        from_checkpoint, self._params_from_checkpoint = self._params_from_checkpoint, False
        if not written:
            return False
        holds_sample = self.resample_on_step and not params_hold_mean
        if not from_checkpoint:
            for bucket, index in written:
                self._adopt_written(bucket, index, holds_sample)
        elif holds_sample and any(self._not_the_pending_sample(bucket, index)
                                  for bucket, index in written):
            # a model file holding other values than the pending sample (the mean, saved inside
            # mean_params()) was loaded after the optimizer: a gradient computed since was
            # not taken at the sample the state records (Note [what the params hold])
            self._grads_before_rewrite = self._layout.grad_versions()
        if holds_sample or from_checkpoint:  # the params hold exactly what the state says
            self._write_resting_params()
            layout.mark_seen()
        return False

    def _resting_values(self, bucket, index: int, holds_sample: bool) -> torch.Tensor:
        """What the optimizer put into a param at rest: the pending sample, or the mean rounded
        to the param's dtype (flat)."""
        where = bucket.slice_of(index)
        if holds_sample:
            expected = torch.empty_like(bucket.param_flat[where])
            self._sample_segment(expected, bucket, Segment(where.start, where.stop,
                                                           bucket.offsets[index]),
                                 self._pending_draw)
            return expected
        return bucket.mean[where].to(bucket.param_flat.dtype)

    def _not_the_pending_sample(self, bucket, index: int) -> bool:
        """Whether a param holds other values than the pending sample, beyond the rounding by
        which two backends' or devices' copies of one sample differ: an element counts as
        different when it is off by more than 8 ulps of the param's dtype and by more than
        1e-3 posterior standard deviations (a mean and a sample differ by |eps| deviations)."""
        where = bucket.slice_of(index)
        current = bucket.param_flat[where].to(bucket.mean.dtype)
        expected = self._resting_values(bucket, index, True).to(bucket.mean.dtype)
        scalars = self._noise_scalars(bucket, self._pending_draw)
        delta = (bucket.prior_precision[where] if bucket.prior_precision is not None
                 else scalars["weight_decay"])
        hess = bucket.hess[where].to(bucket.mean.dtype)
        deviations = (current - expected).abs() * (scalars["ess"] * (hess + delta)).sqrt()
        ulps = 8 * torch.finfo(bucket.param_flat.dtype).eps * torch.maximum(current.abs(),
                                                                             expected.abs())
        return bool(((deviations > 1e-3) & ((current - expected).abs() > ulps)).any())

    def _adopt_written(self, bucket, index: int, holds_sample: bool) -> None:
        where = bucket.slice_of(index)
        current, mean = bucket.param_flat[where], bucket.mean[where]
        expected = self._resting_values(bucket, index, holds_sample)
        mean.copy_(torch.where(current != expected, current.to(mean.dtype), mean))

    def _check_pending_grads(self) -> None:
        """The pending sample's gradient must still be there when it is read."""
        if self._pending_grads is not None and self._layout.grads_dropped(self._pending_grads):
            raise RuntimeError(_DROPPED_MESSAGE)

    def _take_train_draw(self, on_device: bool = True) -> int:
        """The next training draw number. Capturable: the device's counter advances too
        (``on_device``; the drop-in step advances it after its update has read it)."""
        draw = self._next_train_draw
        self._next_train_draw += 1
        if on_device and self._device_draws is not None:
            self._device_draws.add_(1)
        return draw

    # Note [capturable steps]: with capturable=True the kernels never see a training draw number
    # as a launch argument. ``_device_draws`` holds [d, d + 1] on the device, d the last training
    # draw taken (-1 before the first); taking a draw adds 1 to both, on the device, so a
    # captured graph takes fresh draws at every replay. A training draw's op gets draw=0 and
    # device_draws (sample / accumulate: [d]; update: [d, d + 1], the pending sample's draw and
    # the next sample's). Every update gets them, also one without a pending sample and without
    # a next one (the official loop with all samples folded in): bf16 state rounds with the bits
    # of draw [d + 1] (the reference's round_draw), which is exactly the host's rounding index,
    # one more than the step's last training draw: ``_next_train_draw`` in the official loop,
    # and in the drop-in step the next draw, taken on the host only until the update has read
    # [d + 1] (``_finish_step``, then ``_update``'s ``add_(1)``). The host's round_draw is then
    # passed as 0, like the draws, so a replayed update rounds with fresh bits. The host's
    # counters (``_next_train_draw``, ``_pending_draw``) keep the state machine's bookkeeping;
    # after graph replays they lag behind the device, whose values ``_settle_host_draws`` copies
    # back (state_dict). Evaluation draws stay on the host.

    def _draw_kwargs(self, draw, device: torch.device, *, update: bool = False,
                     next_draw=None) -> dict:
        """The draw arguments of an op on ``device``: host numbers, or the device's draws (every
        update, and every op of a training draw, when capturable)."""
        training = draw is not None and draw < EVAL_DRAW_BASE
        if self._device_draws is None or not (training or update):
            kwargs = {"draw": 0 if draw is None else draw}
            if update:
                kwargs["next_draw"] = next_draw
            return kwargs
        draws = self._device_draws
        if draws.device != device:
            draws = to_device(draws, device)
        if update:
            return {"draw": 0, "next_draw": None if next_draw is None else 0,
                    "device_draws": draws}
        return {"draw": 0, "device_draws": draws[:1]}

    def _settle_host_draws(self) -> None:
        """Capturable: the host's draw counters from the device's (graph replays advanced them;
        waits for the device)."""
        if self._device_draws is None:
            return
        self._next_train_draw = int(self._device_draws[1].item())
        if self._pending_draw is not None:
            self._pending_draw = self._next_train_draw - 1

    def _draws_set_on_host(self) -> None:
        """Capturable: the device's counters from the host's (load_state_dict), in place."""
        if self._device_draws is None:
            return
        self._device_draws.copy_(torch.tensor(
            [self._next_train_draw - 1, self._next_train_draw], dtype=torch.int64))
        self._steps.pin_to_device(self._device_draws.device)

    def _reconcile_betas(self) -> None:
        """Note [betas]: ``betas`` and ``beta1``/``beta2`` agree again. Every group is checked
        before any is written."""
        agreed = []
        for index, group in enumerate(self.param_groups):
            seen = self._seen_betas[index]
            official = (group["beta1"], group["beta2"])
            betas = _two_betas(group["betas"])
            if betas != seen and official != seen and betas != official:
                raise ValueError(
                    f"Invalid param group {index}: betas was set to {betas} and beta1, beta2 to "
                    f"{official} since the last step; set one of the two")
            chosen = betas if betas != seen else official
            check_group_hyperparameters(dict(zip(("beta1", "beta2"), chosen)))
            agreed.append(chosen)
        for index, (group, chosen) in enumerate(zip(self.param_groups, agreed)):
            group["beta1"], group["beta2"] = chosen
            group["betas"] = self._seen_betas[index] = chosen

    # ------------------------------------------------------------------ the ops over all segments

    @staticmethod
    def _scalars_of(group: dict) -> dict:
        """The hyperparameters that scale a group's noise."""
        return dict(ess=float(group["ess"]), weight_decay=float(group["weight_decay"]))

    def _noise_scalars(self, bucket, draw) -> dict:
        """ess and weight_decay that scale a draw's noise: for the live training draw, the
        values it was sampled with (a scheduler may change them before its gradient is used;
        ivon-opt keeps the noise it drew), else the group's current ones."""
        live = self._live_scalars
        if draw is not None and draw < EVAL_DRAW_BASE and bucket.group_index < len(live):
            return live[bucket.group_index]
        return self._scalars_of(self.param_groups[bucket.group_index])

    def _record_live_scalars(self) -> None:
        """The next training sample is drawn now: remember its noise scalars."""
        self._live_scalars = [self._scalars_of(group) for group in self.param_groups]

    def _live_scalars_changed(self) -> bool:
        return any(live != self._scalars_of(group)
                   for live, group in zip(self._live_scalars, self.param_groups))

    def _noise_kwargs(self, name, draw, bucket, segment) -> dict:
        return self._noise.op_kwargs(name, draw, bucket, segment)

    def _sample_segment(self, out, bucket, seg, draw) -> None:
        s = seg.slice
        backends.get(bucket.backend).sample(
            out, bucket.mean[s], bucket.hess[s], seed=self._noise.key(),
            **self._draw_kwargs(draw, bucket.device), offset=seg.offset,
            **self._noise_scalars(bucket, draw), **bucket.prior_inputs(s),
            **self._noise_kwargs("eps", draw, bucket, seg))

    def _sample(self, draw: int, buckets=None) -> None:
        for bucket, seg in self._layout.segments(buckets):
            self._sample_segment(bucket.param_flat[seg.slice], bucket, seg, draw)
        self._layout.publish(buckets)

    def _write_resting_params(self) -> None:
        """What the params hold between optimizer calls: the mean, or the pending sample."""
        if self.resample_on_step:
            self._sample(self._pending_draw)
        else:
            self._layout.restore()

    def _fold_pending(self) -> None:
        """Fold the pending sample's gradient into the running averages."""
        self._layout.gather_grads()
        draw, count, key = self._pending_draw, self._count + 1, self._noise.key()
        for bucket, seg in self._layout.segments():
            bucket.ensure_averages()
            s = seg.slice
            backends.get(bucket.backend).accumulate(
                bucket.grad_flat[s], bucket.hess[s], bucket.avg_grad[s], bucket.avg_hess_term[s],
                seed=key, **self._draw_kwargs(draw, bucket.device), offset=seg.offset,
                count=count, hess_approx=self.hess_approx, **bucket.prior_inputs(s),
                **self._noise_scalars(bucket, draw), **self._noise_kwargs("eps", draw, bucket, seg))
        self._noise.forget(draw)
        self._count, self._pending_draw, self._pending_grads = count, None, None

    def _sync_averages(self) -> None:
        """sync=True: every rank is one sample; average the ranks' sample averages."""
        if self._pending_draw is not None:
            self._fold_pending()
        world_size = dist.get_world_size()
        for bucket in self._layout.buckets:
            bucket.ensure_averages()
            for average in (bucket.avg_grad, bucket.avg_hess_term):
                dist.all_reduce(average)
                average.div_(world_size)

    def _update(self, next_draw: Optional[int], grads_bound: bool = False) -> None:
        """The update from the averages and the pending sample; params <- mean or next sample.

        ``grads_bound``: the caller has just seen every grad bound to its flat view."""
        if self._pending_draw is not None and self._live_scalars_changed():
            self._fold_pending()  # its noise needs the old ess / weight_decay; the update the new
        with_grad = self._pending_draw is not None
        if with_grad and not grads_bound:
            self._layout.gather_grads()
        grad_scale, found_inf = self._amp_inputs(with_grad)
        count, key = self._count + (1 if with_grad else 0), self._noise.key()
        draw = self._pending_draw if with_grad else None
        on_device = found_inf is not None or self._steps.on_device  # capturable: pinned there
        if on_device:
            self._steps.advance_on_device(self._layout.buckets[0].device)
        step = None if on_device else self._steps.advance_on_host()
        # capturable: the lr is the group's device tensor (device_lr), the host's a constant 0
        scalars = [StepScalars.for_group({**group, "lr": 0.0} if self.capturable else group, step,
                                         rescale_lr=self.rescale_lr, debias=self.debias)
                   for group in self.param_groups]
        device_inputs: dict = {}  # per (group, device, state dtype): the kernels' device tensors
        # one more than the step's last training draw: grows with every update
        round_draw = self._next_train_draw if next_draw is None else next_draw
        for bucket, seg in self._layout.segments():
            s = seg.slice
            where = (bucket.group_index, bucket.device, bucket.mean.dtype)
            if where not in device_inputs:
                device_inputs[where] = self._device_inputs(bucket, grad_scale, found_inf,
                                                           on_device)
            averages = ((bucket.avg_grad[s], bucket.avg_hess_term[s]) if self._count > 0
                        else (None, None))
            draws = self._draw_kwargs(draw, bucket.device, update=True, next_draw=next_draw)
            # low-precision state rounds with this update's index (docs/DESIGN.md section 16);
            # capturable: the device's draws[1] is that index (Note [capturable steps])
            rounding = ({"round_draw": 0 if "device_draws" in draws else round_draw}
                        if bucket.momentum.dtype != bucket.mean.dtype else {})
            backends.get(bucket.backend).update(
                bucket.param_flat[s], bucket.grad_flat[s] if with_grad else None, bucket.mean[s],
                bucket.momentum[s], bucket.hess[s], *averages,
                scalars=scalars[bucket.group_index], seed=key, **draws, offset=seg.offset,
                count=count, hess_approx=self.hess_approx, **device_inputs[where],
                **bucket.prior_inputs(s, update=True), **rounding,
                **self._noise_kwargs("eps", draw, bucket, seg),
                **self._noise_kwargs("next_eps", next_draw, bucket, seg))
        self._layout.publish()
        if self._device_draws is not None and next_draw is not None:
            self._device_draws.add_(1)  # the next sample, just written, is now the pending one
        self._steps.settle(found_inf)
        self._noise.forget(draw)
        self._count, self._pending_draw, self._pending_grads = 0, next_draw, None
        self._record_live_scalars()

    def _amp_inputs(self, with_grad: bool) -> tuple:
        """(grad_scale, found_inf) of this step, as device tensors or None.

        ``grad_scale`` and the GradScaler's ``found_inf`` are the attributes its fused path sets
        during ``scaler.step(optimizer)``. The optimizer adds its own check of what the scaler
        did not check: the gradients (without a scaler, with ``skip_nonfinite``) and the folded
        sample averages (with ``skip_nonfinite`` or a scaler). ``found_inf`` is then 0 or NaN
        plus the scaler's flag: the kernels skip the step where it is nonzero, and nothing here
        waits for the device.
        """
        grad_scale = getattr(self, "grad_scale", None)
        scaler_found_inf = getattr(self, "found_inf", None)
        if scaler_found_inf is None and not self.skip_nonfinite:
            return grad_scale, None
        home = self._layout.buckets[0].device
        found_inf = torch.zeros(1, dtype=torch.float32, device=home)
        if scaler_found_inf is not None:
            found_inf.add_(to_device(torch.as_tensor(scaler_found_inf, dtype=torch.float32),
                                     home).reshape(1))
        check_grads = with_grad and scaler_found_inf is None
        # a scaler is there to catch overflows: the folded samples it never saw are always checked
        check_averages = self._count > 0 and (self.skip_nonfinite or scaler_found_inf is not None)
        if check_grads or check_averages:
            zero = torch.zeros((), dtype=torch.float32, device=home)
            # what the update reads: the trainable segments (a frozen param's stale gradient
            # must not skip every later step)
            for bucket, seg in self._layout.segments():
                if seg.stop == seg.start:
                    continue
                checked = [bucket.grad_flat] if check_grads else []
                if check_averages:
                    checked += [bucket.avg_grad, bucket.avg_hess_term]
                for values in checked:
                    # x * 0 is 0 for finite x and NaN for inf or NaN: no overflow, no sync
                    for extreme in torch.aminmax(values[seg.slice]):
                        found_inf.addcmul_(to_device(extreme, home), zero)
        _sharded.agree_on_skip(self._layout.buckets, found_inf)
        return grad_scale, found_inf

    def _device_inputs(self, bucket, grad_scale, found_inf, on_device: bool) -> dict:
        """The optional device tensors of a bucket's update (ivon_fast.reference.update)."""
        inputs = {}
        device = bucket.device
        if grad_scale is not None:
            inputs["grad_scale"] = to_device(grad_scale, device)
        if found_inf is not None:
            inputs["found_inf"] = to_device(found_inf, device)
        if self.capturable:
            inputs["device_lr"] = self._lr_on_device(bucket)
        if on_device and self.debias:
            debias = self._steps.debias_on_device(
                self.param_groups[bucket.group_index]["beta1"], bucket.mean.dtype)
            inputs["device_debias"] = to_device(debias, device)
        return inputs

    def _lr_on_device(self, bucket) -> torch.Tensor:
        """The effective lr of a bucket's group, formed on the device from the group's lr tensor
        in double (as ``StepScalars.for_group`` on the host), rounded to the state dtype."""
        group = self.param_groups[bucket.group_index]
        lr = group["lr"]
        if not isinstance(lr, torch.Tensor):  # a float written into the group since: on device
            lr = group["lr"] = _device_lr_tensor(lr, group["params"])
        lr = to_device(lr, bucket.device).to(torch.float64).reshape(1)
        if self.rescale_lr:
            lr = lr * (float(group["hess_init"]) + float(group["weight_decay"]))
        return lr.to(bucket.mean.dtype)

    def _finish_step(self, grads_bound: bool = False) -> None:
        """Average across processes when asked, then update (and resample in drop-in mode)."""
        if self.sync and dist.is_available() and dist.is_initialized():
            self._sync_averages()
        next_draw = self._take_train_draw(on_device=False) if self.resample_on_step else None
        self._update(next_draw, grads_bound)

    # ------------------------------------------------------------------ public API

    def _check_not_in_context(self, what: str, mean_allowed: bool = False) -> None:
        if self._in_context and not (mean_allowed and self._in_mean):
            blocks = "sampled_params()" if mean_allowed else "sampled_params() or mean_params()"
            raise RuntimeError(f"IVON.{what} cannot be called inside {blocks}; leave the block "
                               "first")

    @_on_optimizer
    @contextmanager
    def sampled_params(self, train: bool = False):
        """Put a posterior sample into the params for the duration of the block.

        train=True (the official loop, not with resample_on_step): the gradient computed in the
        block is one MC sample of the next ``step()``. train=False: a sample for prediction, from
        the evaluation noise stream, which never shifts the training noise. On exit the params
        hold what they held before; an exception in the block leaves params and optimizer as they
        were. Writing to the params inside the block is an error (the write would be lost).
        """
        draw = self._enter_sample(train)
        self._in_context = True
        try:
            yield
        except BaseException:
            self._in_context = False
            self._discard_sample(train, draw)
            raise
        self._in_context = False
        self._exit_sample(train, draw)

    @_disable_dynamo
    @torch.no_grad()
    def _enter_sample(self, train: bool) -> int:
        self._check_not_in_context("sampled_params()")
        if train and self.resample_on_step:
            raise RuntimeError(
                "sampled_params(train=True) is the official loop; with resample_on_step=True the "
                "params already hold a training sample: call loss.backward(); optimizer.step()")
        self._prepare()
        if train and self._pending_draw is not None:
            if (self._pending_grads is not None
                    and self._pending_grads != self._layout.grad_versions()):
                raise RuntimeError(_CLEARED_MESSAGE.format(mc=self.mc_samples))
            self._fold_pending()
        if train:
            draw = self._take_train_draw()
            self._record_live_scalars()
        else:
            draw = EVAL_DRAW_BASE + self._next_eval_draw
            self._next_eval_draw += 1
        try:
            self._sample(draw)
        except BaseException:
            self._discard_sample(train, draw)
            raise
        self._layout.mark_seen()
        return draw

    @_disable_dynamo
    @torch.no_grad()
    def _exit_sample(self, train: bool, draw: int) -> None:
        if self._layout.forget_writes():
            self._discard_sample(train, draw)
            raise RuntimeError(
                "parameters were written inside sampled_params(); the block was undone and the "
                "write discarded. Write to parameters outside the block, or inside mean_params() "
                "to set the mean.")
        if train:
            self._pending_draw = draw
            if self._count + 1 < self.mc_samples:
                try:
                    self._fold_pending()  # a later sample's zero_grad could clear this gradient
                except BaseException:  # e.g. a sparse gradient: the sample does not count
                    self._pending_draw = None
                    self._discard_sample(train, draw)
                    raise
            else:
                self._pending_grads = self._layout.grad_versions()
        else:
            self._noise.forget(draw)
        self._layout.sync_requires_grad()
        self._write_resting_params()
        self._layout.mark_seen()

    @_disable_dynamo
    @torch.no_grad()
    def _discard_sample(self, train: bool, draw: int) -> None:
        """Undo a sample that does not count: the params get back what they held before."""
        if train:
            self._next_train_draw -= 1
            if self._device_draws is not None:
                self._device_draws.sub_(1)
        else:
            self._next_eval_draw -= 1
        self._noise.forget(draw)
        self._layout.forget_writes()
        self._layout.sync_requires_grad()
        self._write_resting_params()
        self._layout.mark_seen()

    @_on_optimizer
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

    @_disable_dynamo
    @torch.no_grad()
    def _enter_mean(self) -> None:
        self._check_not_in_context("mean_params()")
        self._prepare()
        self._layout.restore()
        self._layout.mark_seen()

    @_disable_dynamo
    @torch.no_grad()
    def _exit_mean(self, adopt_writes: bool) -> None:
        if adopt_writes:
            self._prepare(params_hold_mean=True)  # writes in the block were made to the mean
        else:
            self._layout.forget_writes()
            self._layout.sync_requires_grad()
        self._write_resting_params()
        self._layout.mark_seen()

    @_disable_dynamo
    @_on_optimizer
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
            return self._step(closure)
        except BaseException:
            # torch's GradScaler removes the attributes it set only when step() returns; left
            # behind, the next scaler.step() would hand over the scale squared
            self.__dict__.pop("grad_scale", None)
            self.__dict__.pop("found_inf", None)
            raise

    def _step(self, closure):
        self._check_not_in_context("step()")
        for group in self.param_groups:  # a value written into param_groups since the last step
            check_group_hyperparameters(group, read_tensors=not self.capturable)
        self._reconcile_betas()
        if closure is not None:
            return self._step_with_closure(closure)
        grads_bound = self._prepare()
        if self._grads_before_rewrite is not None:
            stale = self._grads_before_rewrite == self._layout.grad_versions()
            self._grads_before_rewrite = None
            if stale:
                raise RuntimeError(_OVERWRITTEN_MESSAGE)
        if self.resample_on_step and self.mc_samples > 1:
            raise RuntimeError(
                f"resample_on_step=True trains with one sample per plain step(); for "
                f"mc_samples={self.mc_samples} pass a closure: optimizer.step(closure)")
        if self._pending_draw is None and self._count == 0:
            raise RuntimeError(_NO_SAMPLE_MESSAGE)
        self._check_pending_grads()
        if (getattr(self, "found_inf", None) is not None
                and getattr(self, "grad_scale", None) is None and self._count > 0):
            raise RuntimeError(_UNSCALED_FOLDED_MESSAGE.format(count=self._count))
        self._finish_step(grads_bound)
        return None

    def _step_with_closure(self, closure):
        self._prepare()
        if not self.resample_on_step and self._pending_draw is not None:
            self._fold_pending()  # a finished sample: folding it in changes nothing
        checkpoint = (self._count, self._pending_draw, self._next_train_draw,
                      [(b.avg_grad.clone(), b.avg_hess_term.clone())
                       for b in self._layout.buckets] if self._count > 0 else None)
        device_draws = None if self._device_draws is None else self._device_draws.clone()

        def roll_back():
            self._count, self._pending_draw, self._next_train_draw, averages = checkpoint
            if device_draws is not None:
                self._device_draws.copy_(device_draws)
            for bucket, saved in zip(self._layout.buckets, averages or ()):
                bucket.avg_grad.copy_(saved[0])
                bucket.avg_hess_term.copy_(saved[1])
            self._write_resting_params()
            self._layout.mark_seen()

        losses = []
        try:
            for index in range(self.mc_samples):
                if self.resample_on_step:
                    if index > 0:
                        self._fold_pending()
                        self._pending_draw = self._take_train_draw()
                        self._record_live_scalars()
                        self._sample(self._pending_draw)
                    loss, computed = self._call_closure(closure)
                else:
                    with self.sampled_params(train=True):
                        loss, computed = self._call_closure(closure)
                if index == 0 and not computed:
                    # a do-nothing closure: step on the samples taken before this call
                    if not self.resample_on_step:
                        self._noise.forget(self._pending_draw)
                        roll_back()
                    if self._pending_draw is None and self._count == 0:
                        raise RuntimeError(_NO_SAMPLE_MESSAGE)
                    self._finish_step()
                    return None
                losses.append(loss)
            result = (None if any(loss is None for loss in losses)
                      else sum(losses) / len(losses))
            self._finish_step()
        except BaseException:
            roll_back()
            raise
        return result

    def _call_closure(self, closure) -> tuple:
        """(the closure's loss, whether it computed anything: a loss or a change to the grads)."""
        before = self._layout.grad_versions()
        with torch.enable_grad():
            loss = closure()
        return loss, loss is not None or self._layout.grad_versions() != before

    @_disable_dynamo
    @_on_optimizer
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient in place (grads stay views into the flat buffer).

        ``set_to_none`` is accepted for compatibility and ignored: the gradient storage is part
        of the flat layout, and zeroing it is one memset per bucket. In the official loop, a
        pending sample's gradient is folded into the step's averages first, so clearing
        gradients before the next ``sampled_params`` block never loses a sample.
        """
        if self._pending_draw is not None and not self.resample_on_step and not self._in_context:
            with torch.no_grad():
                self._prepare()
                self._fold_pending()
        self._layout.zero_grads()

    @_disable_dynamo
    @_on_optimizer
    def posterior(self):
        """The posterior learned so far, as an ``ivon_fast.Posterior``: per param (in the order
        of ``param_groups``), its mean and std 1 / sqrt(ess (hess + weight_decay)), copies shaped
        like the param (std 0 for frozen params). Writes to the params since the last optimizer
        call count as usual (they become the mean). Allowed inside ``mean_params()``."""
        self._check_not_in_context("posterior()", mean_allowed=True)
        with torch.no_grad():
            self._prepare(params_hold_mean=self._in_mean)
            return _posterior.of_optimizer(self)

    # ------------------------------------------------------------------ state dicts

    @_disable_dynamo
    @_on_optimizer
    def state_dict(self) -> dict:
        """Everything resuming needs: buffers per param, hyperparameters, counters and seed.

        Honours torch's state-dict hooks (``register_state_dict_pre_hook`` / ``post_hook``).
        """
        # inside a sampled_params() block the params hold a sample that the state does not
        # record, so a model checkpoint taken there could not be told apart from new weights.
        # Inside mean_params() they hold the mean, which the state holds too: a model saved
        # there is the mean (what a model user wants), and loading the pair resumes exactly,
        # as the state says what the params held at rest (Note [what the params hold]).
        self._check_not_in_context("state_dict()", mean_allowed=True)
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        with torch.no_grad():
            self._prepare(params_hold_mean=self._in_mean)
            self._check_pending_grads()
            self._settle_host_draws()
            state_dict = _checkpoint.save(self)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    @_disable_dynamo
    @_on_optimizer
    def load_state_dict(self, state_dict: dict, step: Optional[int] = None) -> None:
        """Load a state dict of this class, or of ivon-opt's ``ivon.IVON``.

        ivon-opt's state dicts hold no step count and no mean (the model's params are the mean):
        load the model's weights first, then pass ``step=<optimizer steps taken>``. Honours
        torch's load-state-dict hooks.
        """
        self._check_not_in_context("load_state_dict()")
        self._layout.check_materialized()
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        _checkpoint.load(self, state_dict, step)
        for index, group in enumerate(self.param_groups):  # the loaded beta1, beta2 decide
            group["betas"] = self._seen_betas[index] = (group["beta1"], group["beta2"])
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def _split_prior(name: str, value, param_groups: list):
    """A constructor-level prior given as one tensor per param covers the params of the groups
    without their own, in order: each such group gets its share. Returns the default that
    later groups (add_param_group) take: the value itself for None and 'init', else None."""
    if not isinstance(value, (list, tuple)):
        return value
    value = list(value)
    takers = [group for group in param_groups if name not in group]
    wanted = sum(len(group["params"]) for group in takers)
    if len(value) != wanted:
        raise ValueError(f"Invalid {name}: {len(value)} tensors for the {wanted} params of the "
                         "param groups without their own (one per param, in order)")
    start = 0
    for group in takers:
        group[name] = value[start:start + len(group["params"])]
        start += len(group["params"])
    return None


def _two_betas(betas) -> tuple:
    try:
        beta1, beta2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"Invalid betas: {betas!r}; it must be a pair (beta1, beta2)") from None
    return beta1, beta2


def _betas_of_new_group(group: dict, defaults: dict) -> None:
    """A new group's ``betas`` and ``beta1``/``beta2`` (Note [betas]): given ``betas`` fill in
    the official names (a contradiction is an error), else ``betas`` follows them."""
    if "betas" in group:
        for name, value in zip(("beta1", "beta2"), _two_betas(group["betas"])):
            if name in group and group[name] != value:
                raise ValueError(f"Invalid param group: betas={tuple(group['betas'])} but "
                                 f"{name}={group[name]}; give one of the two")
            group[name] = value
        check_group_hyperparameters(group)
    group["betas"] = (group.get("beta1", defaults["beta1"]), group.get("beta2", defaults["beta2"]))


def _device_lr_tensor(lr, params) -> torch.Tensor:
    """A capturable group's lr: the given tensor when it is a float tensor of one element on
    the params' device (schedulers then ``fill_`` it in place), else a 0-dim float64 tensor
    there holding the value (read once, here)."""
    device = params[0].device if params else torch.device("cpu")
    if (isinstance(lr, torch.Tensor) and lr.device == device and lr.is_floating_point()
            and lr.numel() == 1):
        return lr
    return torch.tensor(float(lr), dtype=torch.float64, device=device)


def _param_list(params) -> list:
    return [params] if isinstance(params, torch.Tensor) else list(params)
