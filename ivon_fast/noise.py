"""Where the optimizer's noise comes from: the draw numbers, the key, and the two noise sources.

docs/DESIGN.md section 3 fixes the noise of element ``i`` of training or evaluation draw ``draw`` under
key ``seed``. This module decides which key and which draw numbers the optimizer uses:

- Training draws are 0, 1, 2, ...; evaluation draws are ``EVAL_DRAW_BASE + 0, 1, 2, ...``, so
  evaluating never shifts (or repeats) the training noise.
- With ``sync=True`` every rank is one Monte Carlo sample of the same step, so the ranks must draw
  different noise even when the user passed the same seed everywhere: rank ``r`` uses the key
  ``rank_seed(seed, r)`` (rank 0 keeps ``seed``, so a one-process run is unchanged).

Two sources implement the same interface (``PhiloxNoise``, the counter-based default every backend
regenerates by itself, and ``TorchNoise``, ivon-opt's ``torch.randn`` per param group), so the
optimizer never branches on ``rng``: it asks the source for the extra keyword arguments of an op.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._sharded import common_seed
from .reference import EVAL_DRAW_BASE

__all__ = ["EVAL_DRAW_BASE", "rank_seed", "initial_seed", "PhiloxNoise", "TorchNoise"]

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # odd: rank -> key is a bijection on 64-bit integers
_MASK64 = (1 << 64) - 1


def rank_seed(seed: int, rank: int) -> int:
    """The noise key of ``rank`` under ``sync=True``: distinct per rank, ``seed`` itself on rank 0."""
    return (int(seed) + int(rank) * _GOLDEN_GAMMA) & _MASK64


def initial_seed(seed: Optional[int], rng: str, param_groups: list) -> int:
    """The optimizer's seed: the given one, or one drawn from torch's default generator (so
    ``torch.manual_seed`` controls it); with sharded params rank 0's, on every rank."""
    if seed is not None:
        return seed
    # under rng='torch' the seed only drives evaluation noise; drawing it would consume torch's
    # generator and shift the training noise away from ivon-opt's
    seed = torch.initial_seed() if rng == "torch" else int(torch.randint(0, 2**63 - 1, ()))
    return common_seed(param_groups, seed)  # FSDP: one model, one key


def _rank(sync: bool) -> int:
    import torch.distributed as dist
    if sync and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


class PhiloxNoise:
    """The counter-based noise of docs/DESIGN.md section 3 (the default, ``rng='philox'``).

    Every backend regenerates it from (key, draw, global index), so the ops need nothing beyond
    ``seed=key`` and the draw number: ``op_kwargs`` is empty.
    """

    def __init__(self, seed: int, sync: bool):
        self.seed, self.sync = seed, sync

    def key(self) -> int:
        return rank_seed(self.seed, _rank(self.sync))

    def op_kwargs(self, name: str, draw, bucket, segment) -> dict:
        return {}

    def forget(self, draw) -> None:
        pass

    def pending_noise(self, draw, group_index: int, start: int, stop: int):
        return None

    def restore_pending(self, draw, pieces: list) -> None:
        pass


class TorchNoise:
    """ivon-opt's noise (``rng='torch'``): one ``torch.randn(numel of the group)`` per param group
    and draw, in group order, from torch's default generator (evaluation draws: a generator of
    their own, seeded with the seed, so they never consume the default one).

    Only the reference backend takes explicit noise; the tensors of a draw are kept until the draw
    is forgotten (its gradient folded in, or the sample discarded).
    """

    def __init__(self, seed: int, sync: bool, group_params):
        self.seed, self.sync = seed, sync
        self._group_params = group_params  # () -> list of each group's params, in group order
        self._drawn: dict = {}              # draw -> [each group's eps]
        self._eval_generators: dict = {}

    def key(self) -> int:
        return self.seed

    def _group_eps(self, draw: int, group_index: int) -> torch.Tensor:
        # ivon-opt draws every group's noise, in group order, when it samples; a group added
        # later (add_param_group in the middle of a step) draws its own when first needed
        drawn = self._drawn.setdefault(draw, [])
        groups = self._group_params()
        wanted = group_index + 1 if drawn else len(groups)
        while len(drawn) < wanted:
            params = groups[len(drawn)]
            if not params:
                drawn.append(torch.empty(0))
                continue
            first = params[0]
            generator = self._eval_generator(first.device) if draw >= EVAL_DRAW_BASE else None
            drawn.append(torch.randn(sum(p.numel() for p in params), dtype=first.dtype,
                                     device=first.device, generator=generator))
        return drawn[group_index]

    def _eval_generator(self, device) -> torch.Generator:
        if device not in self._eval_generators:
            self._eval_generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._eval_generators[device]

    def op_kwargs(self, name: str, draw, bucket, segment) -> dict:
        """``{name: eps}`` for the segment (``eps`` or ``next_eps``); empty without a draw."""
        if draw is None:
            return {}
        eps = self._group_eps(draw, bucket.group_index)
        local = segment.offset - bucket.group_start
        return {name: eps[local:local + segment.stop - segment.start].to(bucket.mean.device)}

    def forget(self, draw) -> None:
        self._drawn.pop(draw, None)

    def pending_noise(self, draw, group_index: int, start: int, stop: int) -> torch.Tensor:
        """The noise of a param (group-local elements start .. stop) for a state dict."""
        return self._group_eps(draw, group_index)[start:stop].clone()

    def restore_pending(self, draw, pieces: list) -> None:
        """Put back a draw's noise from a state dict: [each group's eps]."""
        self._drawn[draw] = list(pieces)
