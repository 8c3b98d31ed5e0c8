"""``ivon_fast.IVON``: the IVON optimizer over flat parameter buckets.

The class keeps the bookkeeping (param groups, flat buffers, draw counters, state dicts, context
managers); the arithmetic lives in the backend modules (``reference``, ``triton_backend``,
``cpp_backend``), which all implement the op contract documented in ``ivon_fast.reference``.

Note [when a sample's gradient is read]: ivon-opt copies the gradient when a ``sampled_params``
block exits. We read it later, from the flat gradient buffer: when the next training sample is
drawn, or in ``step()``. The values are the same unless the user changes ``.grad`` in between, and
the single-sample loop then needs no extra pass (the update kernel reads the gradient directly), and
gradient clipping or scaling done after the block (``clip_grad_norm_`` before ``step()``) applies to
the last sample, as it would with AdamW.

Note [user writes to params]: between steps the parameters hold the mean (or, with
``resample_on_step``, a sample around it), but the mean itself lives in a separate buffer. When user
code changes a parameter in place (``model.load_state_dict``, ``p.copy_``) or rebinds ``p.data``, the
next optimizer call notices (version counter, storage pointer) and takes the new values as the mean.
"""
from __future__ import annotations

import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.distributed as dist

from . import backends, reference
from .reference import EVAL_DRAW_BASE, state_dtype

_HESS_APPROX = ("price", "gradsq")
_RNGS = ("philox", "torch")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_STATE_FORMAT = "ivon_fast/1"

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


def _check_range(name, value, low, high, low_open=False, high_open=False):
    """Raise ValueError naming the argument unless low (<|<=) value (<|<=) high."""
    try:
        number = math.nan if isinstance(value, (str, bool)) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    ok_low = number > low if low_open else number >= low
    ok_high = number < high if high_open else number <= high
    if not (ok_low and ok_high):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"Invalid {name}: {value!r}; it must be in {interval}")


def _check_group_hyperparameters(group: dict) -> None:
    checks = {
        "lr": (0.0, math.inf, False, True),
        "ess": (0.0, math.inf, True, True),
        "hess_init": (0.0, math.inf, True, True),
        "beta1": (0.0, 1.0, False, False),
        "beta2": (0.0, 1.0, False, False),
        "weight_decay": (0.0, math.inf, False, True),
        "clip_radius": (0.0, math.inf, True, False),
    }
    for name, (low, high, low_open, high_open) in checks.items():
        if name in group:
            value = group[name]
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"Invalid {name}: a tensor of {value.numel()} elements; it "
                                     "must be a number or a one-element tensor")
                value = value.item()
            _check_range(name, value, low, high, low_open, high_open)


@dataclass
class _Segment:
    """A run of trainable params contiguous both in their bucket and in the global index."""
    start: int
    stop: int
    offset: int  # global flat index of the run's first element


@dataclass(eq=False)  # identity: buckets hold tensors
class _Bucket:
    """The params of one param group with one (device, dtype), in flat contiguous buffers."""
    group_index: int
    params: list
    starts: list            # each param's first element in the bucket
    offsets: list           # each param's first element in the global flat index space
    param_flat: torch.Tensor
    grad_flat: torch.Tensor
    mean: torch.Tensor
    momentum: torch.Tensor
    hess: torch.Tensor
    avg_grad: Optional[torch.Tensor] = None
    avg_hess_term: Optional[torch.Tensor] = None
    backend: str = "reference"
    param_views: list = field(default_factory=list)  # each param's shaped view into param_flat
    grad_views: list = field(default_factory=list)   # each param's shaped view into grad_flat
    versions: list = field(default_factory=list)     # each param's _version after our last look
    trainable: list = field(default_factory=list)    # each param's requires_grad at our last look
    _segments_key: tuple = ()
    _segments: list = field(default_factory=list)

    def slice_of(self, index: int) -> slice:
        return slice(self.starts[index], self.starts[index] + self.params[index].numel())

    def segments(self) -> list:
        key = tuple(self.trainable)
        if key != self._segments_key:
            self._segments, run = [], None
            for index, param in enumerate(self.params):
                if not self.trainable[index]:
                    run = None
                    continue
                start, offset = self.starts[index], self.offsets[index]
                if run is not None and run.stop == start and run.offset + start - run.start == offset:
                    run.stop = start + param.numel()
                else:
                    run = _Segment(start, start + param.numel(), offset)
                    self._segments.append(run)
            self._segments_key = key
        return self._segments


class IVON(torch.optim.Optimizer):
    """IVON (Shen et al., ICML 2024): variational learning of a diagonal Gaussian posterior.

    Same constructor and training loop as the official ``ivon.IVON`` (ivon-opt 0.1.3), with fused
    kernels behind it. Parameters are moved once, at construction, into flat buffers per
    (param group, device, dtype): every ``p.data`` and ``p.grad`` becomes a view into them.

    Args:
        params: iterable of tensors or of param-group dicts.
        lr (float): learning rate, >= 0.
        ess (float): effective sample size lambda (usually the training set size), > 0.
        hess_init (float, default 1.0): initial Hessian estimate h0, > 0.
        beta1 (float, default 0.9): momentum coefficient in [0, 1].
        beta2 (float, default 0.99999): Hessian-estimate coefficient in [0, 1].
        weight_decay (float, default 1e-4): prior precision delta, >= 0.
        mc_samples (int, default 1): posterior samples per step, >= 1 (used by ``step(closure)``;
            the context-manager loop averages however many samples it took).
        hess_approx (str, default 'price'): 'price' (reparameterization trick) or 'gradsq'.
        clip_radius (float, default inf): elementwise clip of the preconditioned step, > 0.
        sync (bool, default False): all-reduce the sample averages across the process group.
        debias (bool, default True): debias the momentum by 1 - beta1^t.
        rescale_lr (bool, default True): scale lr by hess_init + weight_decay.
        backend (str, default 'auto'): 'auto', 'reference', 'triton', 'cuda' or 'cpu'. 'auto' takes
            the fastest backend available for each device.
        seed (int or None, default None): 64-bit seed of the noise; None draws one from torch's
            default generator, so ``torch.manual_seed`` controls it.
        rng (str, default 'philox'): 'philox' (counter-based noise shared by every backend) or
            'torch' (``torch.randn`` per group, exactly as ivon-opt; reference backend only).
        resample_on_step (bool, default False): the drop-in mode. Parameters always hold a
            posterior sample; ``loss.backward(); opt.step(); opt.zero_grad()`` trains IVON with one
            MC sample, each step writing the next sample in the same pass as the update.

    Behaviour to know:
        * A trainable param whose ``.grad`` is None at a step gets a zero gradient.
        * A param with ``requires_grad=False`` is frozen: never perturbed, never updated. It may
          be unfrozen later; it then starts from its current value.
        * ``.grad`` is read when the next sample is drawn or at ``step()``, see Note [when a
          sample's gradient is read] in this module.
        * Evaluation samples (``sampled_params(train=False)``) come from a separate noise stream
          and never shift the training noise.
    """

    def __init__(self, params, lr: float, ess: float, hess_init: float = 1.0, beta1: float = 0.9,
                 beta2: float = 0.99999, weight_decay: float = 1e-4, mc_samples: int = 1,
                 hess_approx: str = "price", clip_radius: float = float("inf"), sync: bool = False,
                 debias: bool = True, rescale_lr: bool = True, *, backend: str = "auto",
                 seed: Optional[int] = None, rng: str = "philox",
                 resample_on_step: bool = False):
        defaults = dict(lr=lr, ess=ess, hess_init=hess_init, beta1=beta1, beta2=beta2,
                        weight_decay=weight_decay, clip_radius=clip_radius)
        _check_group_hyperparameters(defaults)
        if (isinstance(mc_samples, bool) or not isinstance(mc_samples, numbers.Integral)
                or mc_samples < 1):
            raise ValueError(f"Invalid mc_samples: {mc_samples!r}; it must be an int >= 1")
        if hess_approx not in _HESS_APPROX:
            raise ValueError(f"Invalid hess_approx: {hess_approx!r}; it must be one of {_HESS_APPROX}")
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(
                f"Invalid backend: {backend!r}; it must be 'auto' or one of {backends.BACKENDS}")
        if rng not in _RNGS:
            raise ValueError(f"Invalid rng: {rng!r}; it must be one of {_RNGS}")
        if rng == "torch" and backend not in ("auto", "reference"):
            raise ValueError(
                f"Invalid backend: {backend!r} with rng='torch'; torch.randn noise is only "
                "available with backend='reference' (or 'auto', which then picks it)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                                 or not 0 <= seed < 2**64):
            raise ValueError(f"Invalid seed: {seed!r}; it must be None or an int in [0, 2**64)")
        for name, flag in (("sync", sync), ("debias", debias), ("rescale_lr", rescale_lr),
                           ("resample_on_step", resample_on_step)):
            if not isinstance(flag, bool):
                raise ValueError(f"Invalid {name}: {flag!r}; it must be True or False")
        param_groups = [params] if isinstance(params, torch.Tensor) else list(params)
        if not param_groups or not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups}]
        # materialize each group's params once: they may be generators such as module.parameters()
        param_groups = [{**group, "params": self._param_list(group["params"])}
                        for group in param_groups]
        backend_choice = "reference" if rng == "torch" else backend
        for group in param_groups:
            _check_group_hyperparameters(group)
            self._check_params(group["params"], backend_choice)

        self.mc_samples = int(mc_samples)
        self.hess_approx = hess_approx
        self.sync = sync
        self.debias = debias
        self.rescale_lr = rescale_lr
        self.rng = rng
        self.resample_on_step = resample_on_step
        self._backend_choice = backend_choice
        if seed is None:
            # Note: under rng='torch' the seed only drives evaluation noise; drawing it would
            # consume torch's generator and shift the training noise away from ivon-opt's.
            seed = torch.initial_seed() if rng == "torch" else int(torch.randint(0, 2**63 - 1, ()))
        self.seed = seed
        self.current_step = 0
        self._next_train_draw = 0
        self._next_eval_draw = 0
        self._count = 0              # samples folded into the running averages this step
        self._pending_draw = None    # draw of the sample whose gradient is not yet folded in
        self._in_context = False
        self._buckets: list = []
        self._numel = 0
        self._torch_noise: dict = {}  # rng='torch': draw -> {bucket index: eps}
        self._eval_generators: dict = {}

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
        if resample_on_step:
            self._pending_draw = self._take_train_draw()
            self._sample(self._pending_draw)

    # ------------------------------------------------------------------ construction

    @staticmethod
    def _param_list(params) -> list:
        return [params] if isinstance(params, torch.Tensor) else list(params)

    @staticmethod
    def _check_params(params: list, backend_choice: str) -> None:
        for param in params:
            if not isinstance(param, torch.Tensor):
                raise TypeError(f"IVON params must be tensors, got {type(param).__name__}")
            if param.dtype not in _FLOAT_DTYPES:
                raise ValueError(f"Invalid param dtype: {param.dtype}; IVON supports {_FLOAT_DTYPES}")
            if param.is_sparse:
                raise ValueError("Invalid param: sparse tensors are not supported by IVON")
            backends.resolve(backend_choice, param.device, param.dtype)  # ValueError if it can't

    def add_param_group(self, param_group: dict) -> None:
        """Add a param group; its params join new flat buckets, existing storage does not move."""
        _check_group_hyperparameters(param_group)
        param_group["params"] = self._param_list(param_group["params"])
        self._check_params(param_group["params"], self._backend_choice)
        super().add_param_group(param_group)
        group_index = len(self.param_groups) - 1
        new_buckets = self._build_buckets(group_index)
        if self._count > 0:  # mid-step: the new params take part with zero past gradients
            for bucket in new_buckets:
                self._ensure_averages(bucket)
        if self.resample_on_step and self._pending_draw is not None:
            self._sample(self._pending_draw, buckets=new_buckets)

    def _build_buckets(self, group_index: int) -> list:
        group = self.param_groups[group_index]
        by_key: dict = {}
        for param in group["params"]:
            by_key.setdefault((param.device, param.dtype), []).append((param, self._numel))
            self._numel += param.numel()
        new_buckets = []
        for (device, dtype), members in by_key.items():
            params = [p for p, _ in members]
            sizes = [p.numel() for p in params]
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            total = sum(sizes)
            sdtype = state_dtype(dtype)
            param_flat = torch.empty(total, dtype=dtype, device=device)
            grad_flat = torch.zeros(total, dtype=dtype, device=device)
            mean = torch.empty(total, dtype=sdtype, device=device)
            for param, start, size in zip(params, starts, sizes):
                with torch.no_grad():
                    param_flat[start:start + size].copy_(param.reshape(-1))
                    mean[start:start + size].copy_(param.reshape(-1))
            bucket = _Bucket(
                group_index=group_index, params=params, starts=starts,
                offsets=[offset for _, offset in members], param_flat=param_flat,
                grad_flat=grad_flat, mean=mean,
                momentum=torch.zeros(total, dtype=sdtype, device=device),
                hess=torch.full((total,), float(group["hess_init"]), dtype=sdtype, device=device),
                backend=backends.resolve(self._backend_choice, device, dtype))
            for index, param in enumerate(params):
                bucket.param_views.append(param_flat[bucket.slice_of(index)].view(param.shape))
                bucket.grad_views.append(grad_flat[bucket.slice_of(index)].view(param.shape))
                param.data = bucket.param_views[index]
                if param.requires_grad:
                    if param.grad is not None:
                        bucket.grad_views[index].copy_(param.grad)
                    param.grad = bucket.grad_views[index]
                self.state[param] = {
                    "mean": bucket.mean[bucket.slice_of(index)].view(param.shape),
                    "momentum": bucket.momentum[bucket.slice_of(index)].view(param.shape),
                    "hess": bucket.hess[bucket.slice_of(index)].view(param.shape),
                }
            bucket.versions = [p._version for p in params]
            bucket.trainable = [p.requires_grad for p in params]
            self._buckets.append(bucket)
            new_buckets.append(bucket)
        return new_buckets

    @property
    def backends(self) -> dict:
        """The concrete backend serving each (device, dtype) of the params."""
        return {(str(b.param_flat.device), b.param_flat.dtype): b.backend for b in self._buckets}

    # ------------------------------------------------------------------ bookkeeping helpers

    @staticmethod
    def _group_scalars(group: dict) -> dict:
        return dict(ess=float(group["ess"]), weight_decay=float(group["weight_decay"]))

    def _take_train_draw(self) -> int:
        draw = self._next_train_draw
        self._next_train_draw += 1
        return draw

    def _adopt_user_writes(self) -> None:
        """Take params changed by user code as the new mean (Note [user writes to params])."""
        for bucket in self._buckets:
            for index, (param, view) in enumerate(zip(bucket.params, bucket.param_views)):
                rebound = param.data_ptr() != view.data_ptr()
                if not rebound and param._version == bucket.versions[index]:
                    continue
                with torch.no_grad():
                    if rebound:
                        if (param.shape, param.dtype, param.device) != (
                                view.shape, view.dtype, view.device):
                            raise RuntimeError(
                                "a parameter managed by IVON changed its shape, dtype or device; "
                                "move or convert the model before creating the optimizer")
                        view.copy_(param.data)
                        param.data = view
                    if not self._holds_resting_values(bucket, index):
                        bucket.mean[bucket.slice_of(index)].copy_(view.reshape(-1))
                bucket.versions[index] = param._version

    def _holds_resting_values(self, bucket: _Bucket, index: int) -> bool:
        """Whether a param written by user code holds exactly what the optimizer put there.

        With resample_on_step the params hold a sample, so a model checkpoint holds one too:
        loading it back (after the optimizer's own state) must not turn that sample into the mean.
        """
        if not (self.resample_on_step and bucket.trainable[index]):
            return False
        where = bucket.slice_of(index)
        segment = _Segment(where.start, where.stop, bucket.offsets[index])
        expected = torch.empty_like(bucket.param_flat[where])
        backends.get(bucket.backend).sample(
            expected, bucket.mean[where], bucket.hess[where], seed=self.seed,
            draw=self._pending_draw, offset=segment.offset,
            **self._group_scalars(self.param_groups[bucket.group_index]),
            **self._noise_kwargs("eps", self._pending_draw, self._buckets.index(bucket), segment))
        return torch.equal(expected, bucket.param_flat[where])

    def _sync_requires_grad(self) -> None:
        """Follow requires_grad changes made since the optimizer last looked.

        A param frozen since then gets its mean back (it may hold a sample); an unfrozen one starts
        from its current value.
        """
        for bucket in self._buckets:
            for index, param in enumerate(bucket.params):
                if param.requires_grad == bucket.trainable[index]:
                    continue
                where = bucket.slice_of(index)
                with torch.no_grad():
                    if param.requires_grad:
                        bucket.mean[where].copy_(bucket.param_flat[where])
                    else:
                        bucket.param_flat[where].copy_(bucket.mean[where])
                bucket.trainable[index] = param.requires_grad

    def _prepare(self) -> None:
        """Catch up with what user code did since the last optimizer call."""
        self._sync_requires_grad()
        self._adopt_user_writes()

    def _gather_grads(self) -> None:
        """Make the flat gradient buffer hold every trainable param's current ``.grad``."""
        for bucket in self._buckets:
            for param, view, trainable in zip(bucket.params, bucket.grad_views, bucket.trainable):
                grad = param.grad
                if not trainable or grad is view:
                    continue
                if grad is None:
                    view.zero_()
                elif grad.is_sparse:
                    raise RuntimeError("IVON does not support sparse gradients (e.g. "
                                       "nn.Embedding(sparse=True)); use dense gradients")
                elif grad.data_ptr() != view.data_ptr() or grad.dtype != view.dtype:
                    view.copy_(grad.reshape(view.shape))
                param.grad = view

    def _ensure_averages(self, bucket: _Bucket) -> None:
        if bucket.avg_grad is None:
            bucket.avg_grad = torch.zeros_like(bucket.mean)
            bucket.avg_hess_term = torch.zeros_like(bucket.mean)

    # ------------------------------------------------------------------ noise under rng='torch'

    def _torch_eps(self, draw: int, bucket_index: int) -> torch.Tensor:
        """ivon-opt's noise: one torch.randn per param group, in group order, per draw."""
        noise = self._torch_noise.setdefault(draw, {})
        if bucket_index not in noise:
            for group_index, group in enumerate(self.param_groups):
                buckets = [i for i, b in enumerate(self._buckets)
                           if b.group_index == group_index and i not in noise]
                if not buckets:
                    continue
                first = group["params"][0]
                generator = (self._eval_generator(first.device) if draw >= EVAL_DRAW_BASE
                             else None)
                group_start = min(b.offsets[0] for b in self._buckets if b.group_index == group_index)
                group_numel = sum(p.numel() for p in group["params"])
                eps = torch.randn(group_numel, dtype=first.dtype, device=first.device,
                                  generator=generator)
                for i in buckets:
                    bucket = self._buckets[i]
                    pieces = [eps[o - group_start:o - group_start + p.numel()]
                              for p, o in zip(bucket.params, bucket.offsets)]
                    noise[i] = torch.cat(pieces).to(bucket.mean.device)
        return noise[bucket_index]

    def _eval_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._eval_generators:
            generator = torch.Generator(device=device)
            generator.manual_seed(self.seed)
            self._eval_generators[device] = generator
        return self._eval_generators[device]

    def _noise_kwargs(self, key: str, draw, bucket_index: int, segment: _Segment) -> dict:
        """The noise arguments of a backend op: the draw number, or explicit eps (rng='torch')."""
        if draw is None or self.rng != "torch":
            return {}
        eps = self._torch_eps(draw, bucket_index)[segment.start:segment.stop]
        return {key: eps}

    # ------------------------------------------------------------------ the ops over all buckets

    def _sample(self, draw: int, buckets=None) -> None:
        for bucket_index, bucket in enumerate(self._buckets):
            if buckets is not None and bucket not in buckets:
                continue
            group = self.param_groups[bucket.group_index]
            op = backends.get(bucket.backend).sample
            for seg in bucket.segments():
                op(bucket.param_flat[seg.start:seg.stop], bucket.mean[seg.start:seg.stop],
                   bucket.hess[seg.start:seg.stop], seed=self.seed, draw=draw, offset=seg.offset,
                   **self._group_scalars(group), **self._noise_kwargs("eps", draw, bucket_index, seg))

    def _restore(self) -> None:
        for bucket in self._buckets:
            for seg in bucket.segments():
                bucket.param_flat[seg.start:seg.stop].copy_(bucket.mean[seg.start:seg.stop])

    def _write_resting_params(self) -> None:
        """What the params hold between optimizer calls: the mean, or the pending sample."""
        if self.resample_on_step:
            self._sample(self._pending_draw)
        else:
            self._restore()

    def _accumulate_pending(self) -> None:
        """Fold the pending sample's gradient into the running averages."""
        self._gather_grads()
        draw, count = self._pending_draw, self._count + 1
        for bucket_index, bucket in enumerate(self._buckets):
            self._ensure_averages(bucket)
            group = self.param_groups[bucket.group_index]
            op = backends.get(bucket.backend).accumulate
            for seg in bucket.segments():
                s = slice(seg.start, seg.stop)
                op(bucket.grad_flat[s], bucket.hess[s], bucket.avg_grad[s], bucket.avg_hess_term[s],
                   seed=self.seed, draw=draw, offset=seg.offset, count=count,
                   hess_approx=self.hess_approx, **self._group_scalars(group),
                   **self._noise_kwargs("eps", draw, bucket_index, seg))
        self._torch_noise.pop(draw, None)
        self._count, self._pending_draw = count, None

    def _sync_averages(self) -> None:
        if self._pending_draw is not None:
            self._accumulate_pending()
        world_size = dist.get_world_size()
        for bucket in self._buckets:
            for average in (bucket.avg_grad, bucket.avg_hess_term):
                dist.all_reduce(average)
                average.div_(world_size)

    def _update(self, next_draw: Optional[int]) -> None:
        with_grad = self._pending_draw is not None
        if with_grad:
            self._gather_grads()
        self.current_step += 1
        count = self._count + (1 if with_grad else 0)
        for bucket_index, bucket in enumerate(self._buckets):
            group = self.param_groups[bucket.group_index]
            beta1, weight_decay = float(group["beta1"]), float(group["weight_decay"])
            lr = float(group["lr"])
            if self.rescale_lr:
                lr = lr * (float(group["hess_init"]) + weight_decay)
            debias = 1.0 - math.pow(beta1, float(self.current_step)) if self.debias else 1.0
            op = backends.get(bucket.backend).update
            for seg in bucket.segments():
                s = slice(seg.start, seg.stop)
                averages = ((bucket.avg_grad[s], bucket.avg_hess_term[s])
                            if bucket.avg_grad is not None and self._count > 0 else (None, None))
                op(bucket.param_flat[s], bucket.grad_flat[s] if with_grad else None,
                   bucket.mean[s], bucket.momentum[s], bucket.hess[s], *averages,
                   seed=self.seed, draw=self._pending_draw if with_grad else 0,
                   next_draw=next_draw, offset=seg.offset, count=count,
                   hess_approx=self.hess_approx, lr=lr, beta1=beta1,
                   beta2=float(group["beta2"]), clip_radius=float(group["clip_radius"]),
                   debias=debias, **self._group_scalars(group),
                   **self._noise_kwargs("eps", self._pending_draw if with_grad else None,
                                        bucket_index, seg),
                   **self._noise_kwargs("next_eps", next_draw, bucket_index, seg))
        self._torch_noise.pop(self._pending_draw, None)
        self._count, self._pending_draw = 0, next_draw

    # ------------------------------------------------------------------ public API

    def _check_not_in_context(self, what: str) -> None:
        if self._in_context:
            raise RuntimeError(f"IVON.{what} cannot be called inside sampled_params() or "
                               "mean_params(); leave the block first")

    @contextmanager
    def sampled_params(self, train: bool = False):
        """Put a posterior sample into the params for the duration of the block.

        train=True (the official loop, not with resample_on_step): the gradient computed in the
        block is one MC sample of the next ``step()``. train=False: a sample for prediction, from
        the evaluation noise stream, which never shifts the training noise. On exit the params
        hold what they held before; an exception in the block leaves params and optimizer as they
        were.
        """
        self._check_not_in_context("sampled_params()")
        if train and self.resample_on_step:
            raise RuntimeError(
                "sampled_params(train=True) is the official loop; with resample_on_step=True the "
                "params already hold a training sample: call loss.backward(); optimizer.step()")
        with torch.no_grad():
            self._prepare()
            if train and self._pending_draw is not None:
                self._accumulate_pending()
            draw = self._next_train_draw if train else EVAL_DRAW_BASE + self._next_eval_draw
            try:
                self._sample(draw)
            except BaseException:
                self._discard_sample(draw)
                raise
        if train:
            self._next_train_draw += 1
        else:
            self._next_eval_draw += 1
        self._in_context = True
        try:
            yield
        except BaseException:
            if train:
                self._next_train_draw -= 1
            else:
                self._next_eval_draw -= 1
            self._discard_sample(draw)
            raise
        finally:
            self._in_context = False
        with torch.no_grad():
            self._sync_requires_grad()
            if train:
                self._pending_draw = draw
            else:
                self._torch_noise.pop(draw, None)
            self._write_resting_params()

    @torch.no_grad()
    def _discard_sample(self, draw: int) -> None:
        """Undo a sample that does not count: the params get back what they held before."""
        self._torch_noise.pop(draw, None)
        self._sync_requires_grad()
        self._write_resting_params()

    @contextmanager
    def mean_params(self):
        """Put the posterior mean into the params (for evaluation or saving) for the block.

        On exit the params hold exactly what they held before: the mean, or with
        resample_on_step the current training sample.
        """
        self._check_not_in_context("mean_params()")
        with torch.no_grad():
            self._prepare()
            self._restore()
        self._in_context = True
        try:
            yield
        finally:
            self._in_context = False
            with torch.no_grad():
                self._sync_requires_grad()
                self._write_resting_params()

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None):
        """One IVON update from the gradients of the samples taken since the last step.

        With a closure (which should zero the grads, compute the loss and call backward), draws a
        sample for each of the mc_samples closure calls and returns the mean loss.
        """
        self._check_not_in_context("step()")
        if closure is not None:
            return self._step_with_closure(closure)
        self._prepare()
        if self.resample_on_step and self.mc_samples > 1:
            raise RuntimeError(
                f"resample_on_step=True trains with one sample per plain step(); for "
                f"mc_samples={self.mc_samples} pass a closure: optimizer.step(closure)")
        if self._pending_draw is None and self._count == 0:
            raise RuntimeError(_NO_SAMPLE_MESSAGE)
        self._finish_step()
        return None

    def _finish_step(self) -> None:
        """Average across processes when asked, then update (and resample in drop-in mode)."""
        if self.sync and dist.is_available() and dist.is_initialized():
            self._sync_averages()
        self._update(self._take_train_draw() if self.resample_on_step else None)

    def _step_with_closure(self, closure):
        self._prepare()
        if not self.resample_on_step and self._pending_draw is not None:
            self._accumulate_pending()  # a finished sample: folding it in changes nothing
        # an exception in a closure call rolls back the samples this step(closure) took
        checkpoint = (self._count, self._pending_draw, self._next_train_draw,
                      [(b.avg_grad.clone(), b.avg_hess_term.clone()) for b in self._buckets]
                      if self._count > 0 else None)
        losses = []
        try:
            if self.resample_on_step:
                for index in range(self.mc_samples):
                    if index > 0:
                        self._accumulate_pending()
                        self._pending_draw = self._take_train_draw()
                        self._sample(self._pending_draw)
                    with torch.enable_grad():
                        losses.append(closure())
            else:
                for _ in range(self.mc_samples):
                    with self.sampled_params(train=True):
                        with torch.enable_grad():
                            losses.append(closure())
        except BaseException:
            self._count, self._pending_draw, self._next_train_draw, averages = checkpoint
            for bucket, saved in zip(self._buckets, averages or ()):
                bucket.avg_grad.copy_(saved[0])
                bucket.avg_hess_term.copy_(saved[1])
            self._write_resting_params()
            raise
        self._finish_step()
        return sum(losses) / len(losses)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero every gradient in place (grads stay views into the flat buffer).

        ``set_to_none`` is accepted for compatibility and ignored: the gradient storage is part
        of the flat layout, and zeroing it is one memset per bucket.
        """
        for bucket in self._buckets:
            bucket.grad_flat.zero_()
            for param, view in zip(bucket.params, bucket.grad_views):
                if param.requires_grad and param.grad is not view:
                    param.grad = view

    # ------------------------------------------------------------------ state dicts

    def state_dict(self) -> dict:
        """Everything resuming needs: buffers per param, hyperparameters, counters and seed."""
        with torch.no_grad():
            self._prepare()
            if self._pending_draw is not None and not self.resample_on_step:
                self._gather_grads()  # the pending sample's gradient is part of the state
        param_ids, state = {}, {}
        for group in self.param_groups:
            for param in group["params"]:
                param_ids[id(param)] = len(param_ids)
        for bucket_index, bucket in enumerate(self._buckets):
            for index, param in enumerate(bucket.params):
                where = bucket.slice_of(index)
                entry = {name: getattr(bucket, name)[where].clone()
                         for name in ("mean", "momentum", "hess")}
                if self._count > 0:
                    entry["avg_grad"] = bucket.avg_grad[where].clone()
                    entry["avg_hess_term"] = bucket.avg_hess_term[where].clone()
                if self._pending_draw is not None and not self.resample_on_step:
                    entry["pending_grad"] = bucket.grad_flat[where].clone()
                if self._pending_draw is not None and self.rng == "torch":
                    entry["pending_noise"] = self._torch_eps(self._pending_draw, bucket_index)[
                        where].clone()
                state[param_ids[id(param)]] = entry
        groups = [{**{k: v for k, v in group.items() if k != "params"},
                   "params": [param_ids[id(p)] for p in group["params"]]}
                  for group in self.param_groups]
        return {
            "state": state,
            "param_groups": groups,
            "ivon": {
                "format": _STATE_FORMAT, "step": self.current_step, "seed": self.seed,
                "next_train_draw": self._next_train_draw, "next_eval_draw": self._next_eval_draw,
                "count": self._count, "pending_draw": self._pending_draw,
                "resample_on_step": self.resample_on_step, "hess_approx": self.hess_approx,
                "rng": self.rng, "mc_samples": self.mc_samples,
            },
        }

    def load_state_dict(self, state_dict: dict, step: Optional[int] = None) -> None:
        """Load a state dict of this class, or of ivon-opt's ``ivon.IVON``.

        ivon-opt's state dicts hold no step count and no mean (the model's params are the mean):
        load the model's weights first, then pass ``step=<optimizer steps taken>``.
        """
        self._check_not_in_context("load_state_dict()")
        saved_groups = state_dict.get("param_groups")
        if not isinstance(saved_groups, list) or len(saved_groups) != len(self.param_groups):
            raise ValueError("state_dict has a different number of param groups than this optimizer")
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError("state_dict's param groups differ in size from this optimizer's")
            _check_group_hyperparameters(saved)
        if "ivon" in state_dict:
            self._load_own(state_dict, saved_groups)
        elif all("momentum" in g and "hess" in g for g in saved_groups):
            if step is None or isinstance(step, bool) or not isinstance(step, int) or step < 0:
                raise ValueError(
                    "Invalid step: an ivon-opt state dict does not record the step count; pass "
                    "load_state_dict(state_dict, step=<int >= 0: optimizer steps taken so far>)")
            self._load_ivon_opt(state_dict, saved_groups, step)
        else:
            raise ValueError("state_dict is neither an ivon_fast nor an ivon-opt IVON state dict")

    def _copy_hyperparameters(self, saved_groups) -> None:
        for saved, group in zip(saved_groups, self.param_groups):
            for key, value in saved.items():
                if key not in ("params", "momentum", "hess", "numel"):
                    group[key] = value

    def _load_own(self, state_dict: dict, saved_groups) -> None:
        meta = state_dict["ivon"]
        if meta.get("format") != _STATE_FORMAT:
            raise ValueError(f"unknown state_dict format {meta.get('format')!r}")
        for key, mine in (("resample_on_step", self.resample_on_step), ("rng", self.rng)):
            if meta[key] != mine:
                raise ValueError(f"state_dict was saved with {key}={meta[key]!r}, this optimizer "
                                 f"has {key}={mine!r}")
        # check everything before changing anything
        needed = ["mean", "momentum", "hess"]
        if meta["count"] > 0:
            needed += ["avg_grad", "avg_hess_term"]
        if meta["pending_draw"] is not None and not self.resample_on_step:
            needed.append("pending_grad")
        if meta["pending_draw"] is not None and self.rng == "torch":
            needed.append("pending_noise")
        saved_state = state_dict["state"]
        flat_params = [p for group in self.param_groups for p in group["params"]]
        for index, param in enumerate(flat_params):
            entry = saved_state.get(index)
            if entry is None:
                raise ValueError(f"state_dict has no state for parameter {index}")
            for name in needed:
                if name not in entry or entry[name].numel() != param.numel():
                    raise ValueError(f"state_dict's {name!r} of parameter {index} is missing or "
                                     f"does not have the parameter's {param.numel()} elements")

        self._copy_hyperparameters(saved_groups)
        self.current_step, self.seed = meta["step"], meta["seed"]
        self._next_train_draw, self._next_eval_draw = meta["next_train_draw"], meta["next_eval_draw"]
        self._count, self._pending_draw = meta["count"], meta["pending_draw"]
        self.hess_approx, self.mc_samples = meta["hess_approx"], meta["mc_samples"]
        self._torch_noise, self._eval_generators = {}, {}
        index_of = {id(p): i for i, p in enumerate(flat_params)}
        with torch.no_grad():
            self._sync_requires_grad()
            for bucket_index, bucket in enumerate(self._buckets):
                if self._count > 0:
                    self._ensure_averages(bucket)
                noise = []
                for index, param in enumerate(bucket.params):
                    entry, where = saved_state[index_of[id(param)]], bucket.slice_of(index)
                    for name in needed:
                        if name in ("mean", "momentum", "hess", "avg_grad", "avg_hess_term"):
                            getattr(bucket, name)[where].copy_(entry[name].reshape(-1))
                    if "pending_grad" in needed:
                        bucket.grad_views[index].copy_(entry["pending_grad"].reshape(param.shape))
                        param.grad = bucket.grad_views[index]
                    if "pending_noise" in needed:
                        noise.append(entry["pending_noise"].reshape(-1).to(bucket.mean.device))
                if noise:
                    self._torch_noise.setdefault(self._pending_draw, {})[bucket_index] = torch.cat(noise)
            self._write_resting_params()
            for bucket in self._buckets:
                bucket.versions = [p._version for p in bucket.params]

    def _load_ivon_opt(self, state_dict: dict, saved_groups, step: int) -> None:
        # check everything before changing anything
        saved_state = state_dict.get("state", {})
        count = int(saved_state.get("count", 0) or 0)
        hess_key = "avg_nxg" if self.hess_approx == "price" else "avg_gsq"
        for saved, group in zip(saved_groups, self.param_groups):
            numel = sum(p.numel() for p in group["params"])
            if saved["momentum"].numel() != numel or saved["hess"].numel() != numel:
                raise ValueError("ivon-opt state_dict's buffers differ in size from this optimizer's")
        if count > 0:
            for key in ("avg_grad", hess_key):
                value = saved_state.get(key)
                if not isinstance(value, torch.Tensor) or value.numel() != self._numel:
                    raise ValueError(f"ivon-opt state_dict holds {count} samples but no {key!r} "
                                     f"of {self._numel} elements (hess_approx={self.hess_approx!r})")

        with torch.no_grad():
            # the model's params are ivon-opt's mean: take them (Note [user writes to params])
            self._prepare()
            self._copy_hyperparameters(saved_groups)
            self.current_step = step
            group_starts = {}
            for group_index in range(len(self.param_groups)):
                group_starts[group_index] = min(
                    (b.offsets[0] for b in self._buckets if b.group_index == group_index), default=0)
            for bucket in self._buckets:
                saved = saved_groups[bucket.group_index]
                if count > 0:
                    self._ensure_averages(bucket)
                for index, param in enumerate(bucket.params):
                    local = bucket.offsets[index] - group_starts[bucket.group_index]
                    where = bucket.slice_of(index)
                    bucket.momentum[where].copy_(saved["momentum"][local:local + param.numel()])
                    bucket.hess[where].copy_(saved["hess"][local:local + param.numel()])
                    if count > 0:
                        flat = slice(bucket.offsets[index], bucket.offsets[index] + param.numel())
                        bucket.avg_grad[where].copy_(saved_state["avg_grad"][flat])
                        bucket.avg_hess_term[where].copy_(saved_state[hess_key][flat])
            self._count = count
            if not self.resample_on_step:
                self._pending_draw = None
            self._write_resting_params()
