"""The parameter shapes the microbenchmark times: a model's tensor list scaled to a param count.

    few-large   ``tensors`` 1-D tensors of about equal size (default 4): the best case for
                every optimizer, one long run of memory per tensor.
    gpt2        GPT-2 small's (125M) parameter list, in Hugging Face's order, scaled to the size:
                token embedding (vocab x d), position embedding (ctx x d), 12 layers of
                ln_1 weight/bias, attn c_attn weight (d x 3d) / bias, attn c_proj weight (d x d) /
                bias, ln_2 weight/bias, mlp c_fc weight (d x 4d) / bias, mlp c_proj weight
                (4d x d) / bias, and the final ln_f weight/bias: 148 tensors from d elements
                (biases, layernorms) to vocab x d. The width d is a multiple of 8 chosen so the
                model has about the requested size; the vocabulary absorbs the rest (as GPT-2's
                odd 50257 does, it leaves the tensors after the embedding at odd offsets).
    odd-group   few-large after a param group of its own holding one 3-element tensor: the
                second group's bucket starts at an odd global offset (issue 19's lead pad,
                Note [quads in the buffers] in ivon_fast/_bucket.py). Not in the default sweep.
"""
from __future__ import annotations

import math

SHAPES = ("few-large", "gpt2", "odd-group")
DEFAULT_SHAPES = ("few-large", "gpt2")
ODD_GROUP = 3  # the first group's elements in the odd-group shape


class Shapes(list):
    """A model's param shapes, and the indices where a new param group starts (none: one
    group)."""
    group_starts: tuple = ()

# GPT-2 small: 12 layers, width 768, context 1024, vocabulary 50257 (124,439,808 params)
_GPT2_LAYERS, _GPT2_WIDTH, _GPT2_CTX, _GPT2_VOCAB = 12, 768, 1024, 50257


def gpt2_shapes(width: int, vocab: int, ctx: int, layers: int = _GPT2_LAYERS) -> list:
    """GPT-2's parameter shapes (Hugging Face order, Conv1D weights as (in, out))."""
    d = width
    shapes = [(vocab, d), (ctx, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def _gpt2_scaled(numel: int) -> list:
    # params ~ d^2 * ((vocab + ctx) / 768 + 12 * 12) for the scaled model
    per_d2 = (_GPT2_VOCAB + _GPT2_CTX) / _GPT2_WIDTH + 12 * _GPT2_LAYERS
    width = max(8, 8 * round(math.sqrt(numel / per_d2) / 8))
    ctx = max(1, round(_GPT2_CTX * width / _GPT2_WIDTH))
    body = sum(math.prod(s) for s in gpt2_shapes(width, 0, ctx))
    vocab = max(1, round((numel - body) / width))
    return gpt2_shapes(width, vocab, ctx)


def param_shapes(shape: str, numel: int, tensors: int = 4) -> list:
    """The list of parameter shapes of model ``shape`` with about ``numel`` elements in all."""
    if shape == "few-large":
        tensors = max(1, min(tensors, numel))
        return [(numel // tensors + (1 if i < numel % tensors else 0),) for i in range(tensors)]
    if shape == "gpt2":
        return _gpt2_scaled(numel)
    if shape == "odd-group":
        shapes = Shapes([(ODD_GROUP,), *param_shapes("few-large", numel - ODD_GROUP, tensors)])
        shapes.group_starts = (1,)
        return shapes
    raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def param_groups(shapes: list, params: list) -> list:
    """The params of ``shapes`` as an optimizer's param groups (split where ``group_starts``
    says)."""
    bounds = [0, *getattr(shapes, "group_starts", ()), len(params)]
    return [{"params": params[start:stop]} for start, stop in zip(bounds, bounds[1:])]


def describe(shape: str, shapes: list) -> str:
    """A short description: the tensor count, the width for gpt2, the groups for odd-group."""
    if shape == "odd-group":
        return f"{shape} (1 + {len(shapes) - 1} tensors in two param groups)"
    if shape == "gpt2":
        return f"gpt2 ({len(shapes)} tensors, d={shapes[0][1]}, vocab={shapes[0][0]})"
    return f"{shape} ({len(shapes)} tensors)"
