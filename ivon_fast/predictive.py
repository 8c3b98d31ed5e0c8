"""Predictive distributions of an IVON posterior, and their calibration.

``predict`` runs a classifier over a data loader at the posterior mean or at posterior samples and
returns the class probabilities (the Bayesian model average: softmax probabilities averaged over
the samples). ``calibration`` scores them (accuracy, NLL, expected calibration error, Brier) and
``reliability`` gives the per-bin numbers of a reliability diagram.

Note [the sample order]: sample k (k = 0 .. samples-1) writes into param i (in the posterior's
order: for an IVON, ``param_groups`` order)

    where(std_i == 0, mean_i, mean_i + std_i * eps_{k,i}),  rounded to the param's dtype,

computed in the dtype of the posterior's mean (fp32 for bf16/fp16 params). ``eps_{k,i}`` is
``torch.randn(mean_i.shape, dtype=mean_i.dtype, device=param_i.device, generator=g)`` where ``g`` is
one ``torch.Generator(device=param_i.device).manual_seed(seed)`` per device, created at the start
of the call, and the draws are taken sample by sample, and within a sample param by param
(every param draws, frozen or not). The numbers therefore depend on the device type (CPU and CUDA
generators differ) but not on the model's training history or torch's global RNG.

Note [loader passes]: the outer loop is over the samples, the inner over the loader: a model that
does not fit twice in memory needs no second copy of its activations, and only one sample's params
exist at a time. So the loader is iterated once per sample (once for samples=0) and must yield
the same examples in the same order every time (``DataLoader(shuffle=False)``, no random
augmentation): the targets of every pass are checked against the first.

Note [leaving no trace]: the params are written with ``p.data.copy_`` (the storage stays where
it is, which an IVON optimizer's flat buffers need, and ``p``'s version counter does not move, so
the optimizer does not take the writes for user writes), and on return, or on an exception, every
param gets back its exact bits from a copy taken at the start. Iterating a ``DataLoader`` draws a
base seed from torch's global generator, so its state (CPU and the CUDA devices the model or the
batches are on) is restored too: a training loop's shuffling and dropout continue as without the
call.
"""
from __future__ import annotations

from collections.abc import Mapping
from numbers import Integral

import torch

from ._wrappers import unwrap
from .posterior import Posterior

# -log of this is the largest NLL one example can contribute (about 87.3 nats): the smallest
# normal float32, so a probability of exactly 0 for the target stays finite.
NLL_FLOOR = torch.finfo(torch.float32).tiny

# Rows of probs must sum to 1 within this: an average of float32 softmaxes is off by ~1e-6, fp16
# probabilities by ~1e-3.
ROW_SUM_ATOL = 2e-3

_METRICS_HINT = "pip install torchmetrics"


def predict(model, source, loader, *, samples: int = 0, seed: int = 0, progress: bool = True,
            device=None, forward=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predictive class probabilities of `model` over `loader`, at the posterior mean
    (samples=0) or averaged over `samples` posterior samples: probs [N, C] (float32, on CPU),
    targets [N] (int64, CPU).

    Runs under ``model.eval()`` and ``torch.no_grad()``. On return (or on an exception) the
    params hold exactly what they held before, in the same storage, every module's ``training``
    flag is as before, and torch's global RNG state is as before, so an IVON optimizer training
    ``model`` continues bit for bit as without the call (Note [leaving no trace]).

    Args:
        model (torch.nn.Module): the classifier.
        source: an ``ivon_fast.IVON``, a wrapper exposing it as ``.optimizer`` (Lightning's
            ``LightningOptimizer``, accelerate's ``AcceleratedOptimizer``), or an
            ``ivon_fast.Posterior``. For an optimizer, its params (``param_groups`` order) must be
            params of ``model``; params of ``model`` it does not hold are left as they are. For a
            Posterior, its entries are matched to ``list(model.parameters())`` in order (same count
            and shapes).
        loader (iterable): batches, yielding the same examples in the same order on every pass
            (Note [loader passes]); e.g. ``DataLoader(..., shuffle=False)``.
        samples (int, default 0): 0: one pass with the params at the posterior mean; K >= 1: the
            softmax probabilities averaged over K posterior samples, one loader pass each.
        seed (int, default 0): seed of the samples' noise, in [0, 2**64 - 1]; the draw order is
            Note [the sample order]. Unused for samples=0.
        progress (bool, default True): a tqdm bar over passes x batches (no bar, and no error,
            when tqdm is not installed).
        device (torch.device or str, default None): where batches go; None: the device of the
            model's first param (CPU for a model without params).
        forward (callable, default None): ``forward(model, batch) -> (logits [B, C], targets [B])``
            for a batch already moved to ``device``. None handles ``(inputs, targets)`` tuples or
            lists (``model(inputs)``) and mappings with a ``'labels'`` key (``model(**rest)``,
            taking ``.logits`` when the output has it). For per-token outputs, flatten them and
            drop ignored positions in your own ``forward``.

    Returns:
        (probs, targets): probs [N, C] float32 on CPU (rows sum to 1), targets [N] int64 on CPU.

    Raises:
        ValueError: bad arguments, a posterior that does not match ``model``, a loader that is
            empty or yields different targets on different passes, malformed ``forward`` output.
    """
    _check_predict_args(model, samples, seed, progress, forward)
    run_forward = _default_forward if forward is None else forward
    device = _batch_device(model, device)
    params, means, stds = _matched_posterior(model, source)
    # move the posterior next to each param once (a loaded Posterior is on the CPU)
    means = [m.detach().to(p.device) for m, p in zip(means, params)]
    stds = [s.detach().to(p.device) for s, p in zip(stds, params)]
    samples, seed = int(samples), int(seed)  # numpy integers too
    passes = max(samples, 1)

    saved_params = [p.detach().clone() for p in params]
    saved_modes = [(module, module.training) for module in model.modules()]
    rng_devices = {p.device for p in params} | {device}
    saved_rng = _rng_state(rng_devices)
    bar = _progress_bar(progress, passes, loader)
    first_targets, prob_sums = [], []
    try:
        model.eval()
        with torch.no_grad():
            generators = _sample_generators(params, seed) if samples > 0 else {}
            for k in range(passes):
                _put_sample(params, means, stds, generators if samples > 0 else None)
                _one_pass(model, loader, run_forward, device, k, first_targets, prob_sums, bar)
    finally:
        with torch.no_grad():
            for p, saved in zip(params, saved_params):
                p.data.copy_(saved)
        for module, mode in saved_modes:
            module.training = mode
        _set_rng_state(saved_rng)
        if bar is not None:
            bar.close()

    if not first_targets:
        raise ValueError("Invalid loader: it yielded no batches")
    probs = (torch.cat(prob_sums) / passes).float()
    return probs, torch.cat(first_targets)


def _batch_device(model, device) -> torch.device:
    """Where batches go: ``device``, or the device of the model's first param (CPU without)."""
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    return torch.device(device)


def _sample_generators(params: list, seed: int) -> dict:
    """One generator per device of ``params``, seeded with ``seed`` (Note [the sample order])."""
    generators = {}
    for p in params:
        if p.device not in generators:
            generators[p.device] = torch.Generator(device=p.device).manual_seed(seed)
    return generators


def _put_sample(params: list, means: list, stds: list, generators) -> None:
    """The params <- the mean (``generators`` None), or the next posterior sample."""
    for p, mean, std in zip(params, means, stds):
        if generators is None:
            p.data.copy_(mean)
        else:
            eps = torch.randn(mean.shape, dtype=mean.dtype, device=p.device,
                              generator=generators[p.device])
            p.data.copy_(torch.where(std == 0, mean, mean + std * eps))


def calibration(probs, targets, n_bins: int = 15) -> dict:
    """{'accuracy', 'nll', 'ece', 'brier'} as Python floats.

    - accuracy: top-1 accuracy (``torchmetrics`` ``multiclass_accuracy``, average='micro'; ties
      go to the lowest class index).
    - nll: mean over examples of -log p[target], with p clamped below at ``NLL_FLOOR`` (the
      smallest normal float32, ~1.18e-38: at most ~87.3 nats per example).
    - ece: expected calibration error (L1) over ``n_bins`` equal-width confidence bins, exactly
      ``sum(count / N * |accuracy - confidence|)`` over the bins of ``reliability``. It agrees with
      ``torchmetrics``' ``multiclass_calibration_error(norm='l1')`` except that a confidence of
      exactly 1.0 counts in the last bin [1 - 1/n_bins, 1], as in Guo et al. (2017), where
      torchmetrics 1.9 puts it in an extra bin of its own (Lightning-AI/torchmetrics#3510).
    - brier: mean over examples of sum over classes (p - onehot(target))^2 (in [0, 2]).

    Args:
        probs (tensor [N, C]): class probabilities, rows summing to 1 (within 2e-3).
        targets (tensor [N]): class indices in [0, C).
        n_bins (int, default 15): confidence bins of the ECE, >= 1.

    Raises:
        ImportError: torchmetrics is missing (``pip install torchmetrics``).
    """
    probs, targets = _check_probs_targets(probs, targets)
    n_bins = _check_n_bins(n_bins)
    multiclass_accuracy = _torchmetrics_accuracy()
    n, classes = probs.shape
    accuracy = multiclass_accuracy(probs, targets, num_classes=classes, average="micro")
    p64 = probs.double()
    p_target = p64.gather(1, targets[:, None]).squeeze(1)
    nll = -p_target.clamp_min(NLL_FLOOR).log().mean()
    onehot = torch.nn.functional.one_hot(targets, classes).double()
    brier = (p64 - onehot).pow(2).sum(1).mean()
    bins = reliability(probs, targets, n_bins)
    ece = (bins["count"].double() / n * (bins["accuracy"] - bins["confidence"]).abs()).sum()
    return {"accuracy": float(accuracy), "nll": float(nll), "ece": float(ece),
            "brier": float(brier)}


def reliability(probs, targets, n_bins: int = 15) -> dict:
    """Per-bin data for a reliability diagram: {'confidence': [n_bins], 'accuracy': [n_bins],
    'count': [n_bins], 'edges': [n_bins + 1]} (tensors).

    An example's confidence is its top probability (ties: the lowest class index is the
    prediction). Bin b holds the confidences in [edges[b], edges[b + 1]), the last bin also 1.0;
    ``edges = torch.linspace(0, 1, n_bins + 1)`` in float32, and confidences are binned as float32
    (as torchmetrics does). 'confidence' and 'accuracy' are the bin's mean confidence and fraction
    of correct predictions (float64; 0 in an empty bin: mask with ``count > 0`` before plotting),
    'count' the bin's number of examples (int64), all on the CPU.

    Args:
        probs (tensor [N, C]): class probabilities, rows summing to 1 (within 2e-3).
        targets (tensor [N]): class indices in [0, C).
        n_bins (int, default 15): equal-width bins over [0, 1], >= 1.
    """
    probs, targets = _check_probs_targets(probs, targets)
    n_bins = _check_n_bins(n_bins)
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == targets).double()
    edges = torch.linspace(0, 1, n_bins + 1)
    index = (torch.bucketize(confidence.float(), edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.int64).scatter_add_(0, index, torch.ones_like(index))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, confidence.double())
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).scatter_add_(0, index, correct)
    safe = count.clamp_min(1).double()  # an empty bin has zero sums: reports 0, not NaN
    return {"confidence": conf_sum / safe, "accuracy": correct_sum / safe, "count": count,
            "edges": edges}


# ---------------------------------------------------------------------------- predict's pieces

def _check_predict_args(model, samples, seed, progress, forward) -> None:
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"Invalid model: expected a torch.nn.Module, got {type(model).__name__}")
    if isinstance(samples, bool) or not isinstance(samples, Integral) or samples < 0:
        raise ValueError(f"Invalid samples: expected an int >= 0 (0: the posterior mean), got "
                         f"{samples!r}")
    if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"Invalid seed: expected an int in [0, 2**64 - 1], got {seed!r}")
    if not isinstance(progress, bool):
        raise ValueError(f"Invalid progress: expected True or False, got {progress!r}")
    if forward is not None and not callable(forward):
        raise ValueError(f"Invalid forward: expected None or a callable "
                         f"forward(model, batch) -> (logits, targets), got {forward!r}")


def _matched_posterior(model, source) -> tuple:
    """(params, means, stds): the params of ``model`` to perturb and their posterior, matched
    by name, or by identity with the params it was built from (Note [posteriors know their
    params] in ``posterior``)."""
    if isinstance(source, Posterior):
        return _params_of(model, source), list(source.mean), list(source.std)
    try:
        optimizer = unwrap(source)
    except TypeError:
        raise ValueError(f"Invalid source: expected an ivon_fast.IVON, a wrapper exposing one as "
                         f".optimizer, or an ivon_fast.Posterior; got {type(source).__name__}"
                         ) from None
    posterior = optimizer.posterior()
    return _params_of(model, posterior), posterior.mean, posterior.std


def _params_of(model, posterior) -> list:
    """``model``'s params in the posterior's order (ValueError naming the first mismatch)."""
    owned = dict(model.named_parameters())
    if posterior.names is not None:
        missing = [name for name in posterior.names if name not in owned]
        if missing:
            raise ValueError(f"Invalid source: the posterior's param {missing[0]!r} is not a "
                             "parameter of model")
        params = [owned[name] for name in posterior.names]
    else:
        params = posterior.live_params()
        if params is None:
            raise ValueError("Invalid source: the Posterior has no param names and was not built "
                             "from live params, so it cannot be matched to model's params safely; "
                             "give it names (Posterior.with_names, IVON(model.named_parameters()) "
                             "or opt.posterior(model))")
        ids = {id(p) for p in owned.values()}
        for index, param in enumerate(params):
            if id(param) not in ids:
                raise ValueError(f"Invalid source: the posterior's param {index} (shape "
                                 f"{tuple(param.shape)}) is not a parameter of model")
    for name, param, mean in zip(posterior.names or range(len(params)), params, posterior.mean):
        if param.shape != mean.shape:
            raise ValueError(f"Invalid source: the posterior's param {name!r} has shape "
                             f"{tuple(mean.shape)} but model's has {tuple(param.shape)}")
    return params


def _one_pass(model, loader, run_forward, device, k, first_targets, prob_sums, bar) -> None:
    """Add this pass's probabilities to ``prob_sums`` (pass 0 creates them, and records the
    targets every later pass must reproduce)."""
    seen = 0
    for b, batch in enumerate(loader):
        logits, targets = _checked_output(run_forward(model, _to_device(batch, device)), b)
        targets = targets.to("cpu", torch.int64)
        probs = torch.softmax(logits.float(), dim=1).to("cpu", torch.float64)
        if prob_sums and probs.shape[1] != prob_sums[0].shape[1]:
            raise ValueError(f"Invalid forward output: batch {b} has {probs.shape[1]} classes, "
                             f"batch 0 had {prob_sums[0].shape[1]}")
        if k == 0:
            first_targets.append(targets)
            prob_sums.append(probs)
        else:
            if b >= len(first_targets) or not torch.equal(targets, first_targets[b]):
                raise ValueError(_changed_loader_message(k, b))
            prob_sums[b] += probs
        seen += 1
        if bar is not None:
            bar.update(1)
    if k > 0 and seen != len(first_targets):
        raise ValueError(_changed_loader_message(k, seen))


def _changed_loader_message(k: int, b: int) -> str:
    return (f"Invalid loader: pass {k} yielded different targets at batch {b} than pass 0; "
            "predict() iterates the loader once per sample and needs the same examples in the "
            "same order every time (DataLoader(shuffle=False), no random sampling)")


def _checked_output(output, b: int) -> tuple:
    if not (isinstance(output, (tuple, list)) and len(output) == 2):
        raise ValueError(f"Invalid forward output at batch {b}: expected (logits, targets), got "
                         f"{type(output).__name__}")
    logits, targets = output
    if not (torch.is_tensor(logits) and logits.dim() == 2 and logits.is_floating_point()):
        raise ValueError(f"Invalid forward output at batch {b}: logits must be a floating tensor "
                         f"[B, C], got {_describe(logits)}")
    if not (torch.is_tensor(targets) and targets.dim() == 1
            and not targets.is_floating_point() and not targets.is_complex()):
        raise ValueError(f"Invalid forward output at batch {b}: targets must be an integer tensor "
                         f"[B] of class indices, got {_describe(targets)}")
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"Invalid forward output at batch {b}: {logits.shape[0]} rows of logits "
                         f"but {targets.shape[0]} targets")
    return logits, targets


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _default_forward(model, batch) -> tuple:
    """(inputs, targets) -> model(inputs); {'labels': y, **rest} -> model(**rest)(.logits)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        inputs, targets = batch
        return model(inputs), targets
    if isinstance(batch, Mapping) and "labels" in batch:
        rest = {key: value for key, value in batch.items() if key != "labels"}
        output = model(**rest)  # without labels: a Hugging Face model would also compute a loss
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, Mapping) and "logits" in output:
            logits = output["logits"]
        return (output if logits is None else logits), batch["labels"]
    raise ValueError(f"Invalid batch for the default forward: expected an (inputs, targets) pair "
                     f"or a mapping with a 'labels' key, got {type(batch).__name__}; pass "
                     "forward=lambda model, batch: (logits, targets)")


def _to_device(batch, device: torch.device):
    """Tensors in (nested) tuples, lists and mappings moved to ``device``; other leaves as is."""
    if torch.is_tensor(batch):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple
        return type(batch)(*(_to_device(value, device) for value in batch))
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def _progress_bar(progress: bool, passes: int, loader):
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    try:
        total = passes * len(loader)
    except TypeError:  # an iterable without a length
        total = None
    return tqdm(total=total, desc="predict", unit="batch")


def _rng_state(devices) -> tuple:
    cuda = sorted({d.index if d.index is not None else torch.cuda.current_device()
                   for d in devices if d.type == "cuda"})
    return torch.get_rng_state(), [(i, torch.cuda.get_rng_state(i)) for i in cuda]


def _set_rng_state(state) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for index, value in cuda:
        torch.cuda.set_rng_state(value, index)


# ---------------------------------------------------------------------------- metrics' pieces

def _check_n_bins(n_bins) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, Integral) or n_bins < 1:
        raise ValueError(f"Invalid n_bins: expected an int >= 1, got {n_bins!r}")
    return int(n_bins)


def _check_probs_targets(probs, targets) -> tuple:
    """probs and targets as CPU tensors, checked."""
    probs = torch.as_tensor(probs).detach().cpu()
    targets = torch.as_tensor(targets).detach().cpu()
    if probs.dim() != 2 or not probs.is_floating_point() or probs.shape[0] == 0:
        raise ValueError(f"Invalid probs: expected a floating tensor [N, C] with N >= 1, got "
                         f"{_describe(probs)}")
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()) or bool((probs > 1).any()):
        raise ValueError("Invalid probs: expected probabilities in [0, 1]")
    row_error = (probs.double().sum(1) - 1).abs().max().item()
    if row_error > ROW_SUM_ATOL:
        raise ValueError(f"Invalid probs: each row must sum to 1 within {ROW_SUM_ATOL}; a row is "
                         f"off by {row_error:.3g} (pass probabilities, not logits)")
    if (targets.dim() != 1 or targets.is_floating_point() or targets.is_complex()
            or targets.dtype == torch.bool):
        raise ValueError(f"Invalid targets: expected an integer tensor [N] of class indices, got "
                         f"{_describe(targets)}")
    if targets.shape[0] != probs.shape[0]:
        raise ValueError(f"Invalid targets: {targets.shape[0]} targets for {probs.shape[0]} rows "
                         "of probs")
    classes = probs.shape[1]
    if bool((targets < 0).any()) or bool((targets >= classes).any()):
        raise ValueError(f"Invalid targets: class indices must be in [0, {classes - 1}] "
                         f"(probs has {classes} classes), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")
    return probs, targets.long()


def _torchmetrics_accuracy():
    try:
        from torchmetrics.functional.classification import multiclass_accuracy
    except ImportError as error:
        raise ImportError(f"ivon_fast.calibration needs torchmetrics: {_METRICS_HINT}") from error
    return multiclass_accuracy


__all__ = ["predict", "calibration", "reliability", "NLL_FLOOR"]
