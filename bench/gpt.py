"""A small GPT-style transformer in plain torch, and synthetic token data, for the benchmarks.

The model follows GPT-2 (as nanoGPT writes it): token and position embeddings, pre-LayerNorm
blocks (causal self-attention through ``torch.nn.functional.scaled_dot_product_attention``, then a
4x GELU MLP), a final LayerNorm, and an LM head **tied** to the token embedding (as GPT-2 does).
Linear layers and LayerNorms have no bias (nanoGPT's ``bias=False``, the setting of the IVON
paper's GPT-2 runs). Weights are initialised as in GPT-2: N(0, 0.02), the residual projections
N(0, 0.02 / sqrt(2 * layers)). No dropout.

The data is synthetic and deterministic from a seed (no downloads): token streams drawn from a
random first-order Markov chain in which every token has ``branching`` possible successors, chosen
uniformly. A model can learn it (the loss falls from about ln(vocab) towards ln(branching)), so a
broken training setup shows as a loss that does not fall.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    layers: int
    width: int
    heads: int
    context: int
    vocab: int

    @property
    def params(self) -> int:
        """Trainable parameter count (the head is tied to the token embedding)."""
        per_block = 12 * self.width ** 2 + 2 * self.width  # qkv 3w², proj w², MLP 8w², 2 LN
        return self.vocab * self.width + self.context * self.width + self.layers * per_block + (
            self.width)


CONFIGS = {
    # about a minute for the whole e2e comparison on a 2-core CPU
    "tiny": GPTConfig(layers=4, width=128, heads=4, context=128, vocab=4096),
    # GPT-2 small ("124M"; 125M in the GPT-3 paper's naming)
    "gpt2-125m": GPTConfig(layers=12, width=768, heads=12, context=1024, vocab=50257),
}


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.heads = config.heads
        self.ln_1 = nn.LayerNorm(config.width, bias=False)
        self.qkv = nn.Linear(config.width, 3 * config.width, bias=False)
        self.attn_proj = nn.Linear(config.width, config.width, bias=False)
        self.ln_2 = nn.LayerNorm(config.width, bias=False)
        self.fc = nn.Linear(config.width, 4 * config.width, bias=False)
        self.mlp_proj = nn.Linear(4 * config.width, config.width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = self.qkv(self.ln_1(x)).split(width, dim=2)
        q, k, v = (t.view(batch, time, self.heads, width // self.heads).transpose(1, 2)
                   for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(batch, time, width))
        return x + self.mlp_proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.width % config.heads:
            raise ValueError(f"width {config.width} is not a multiple of heads {config.heads}")
        self.config = config
        self.wte = nn.Embedding(config.vocab, config.width)
        self.wpe = nn.Embedding(config.context, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width, bias=False)
        self.apply(self._init)
        for name, param in self.named_parameters():
            if name.endswith(("attn_proj.weight", "mlp_proj.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * config.layers))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean next-token cross-entropy of ``tokens`` against ``targets`` (both [B, T])."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # the tied head
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.view(-1))


def param_shapes(config: GPTConfig) -> list:
    """The shapes of the model's trainable params, in ``model.parameters()`` order, without
    building the model (for microbenchmarks with a transformer's tensor layout)."""
    w = config.width
    block = [(w,), (3 * w, w), (w, w), (w,), (4 * w, w), (w, 4 * w)]
    return [(config.vocab, w), (config.context, w)] + block * config.layers + [(w,)]


def markov_batches(config: GPTConfig, batch: int, count: int, seed: int = 0,
                   branching: int = 4) -> list:
    """``count`` (tokens, targets) pairs of shape [batch, context], on the CPU, deterministic
    from ``seed``: streams of a random Markov chain where each token has ``branching``
    successors."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(config.vocab, (config.vocab, branching), generator=generator)
    rows = batch * count
    streams = torch.empty(rows, config.context + 1, dtype=torch.long)
    streams[:, 0] = torch.randint(config.vocab, (rows,), generator=generator)
    choices = torch.randint(branching, (rows, config.context), generator=generator)
    for t in range(config.context):
        streams[:, t + 1] = successors[streams[:, t], choices[:, t]]
    streams = streams.view(count, batch, config.context + 1)
    return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in streams]
