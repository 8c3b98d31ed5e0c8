"""The names the docs' code blocks assume, for tests/test_docs.py.

Each function returns a fresh namespace for one page's blocks: a small model, its data and an
optimizer, as a reader of that page has them at that point. Everything is tiny and on the CPU, so
a block runs in a second or two; the blocks themselves are unchanged. Which page gets which
function: PRELUDES.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import ivon_fast


def _classification_data(count: int, features: int, classes: int, seed: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(count, features, generator=generator),
                         torch.randint(0, classes, (count,), generator=generator))


def _mlp() -> torch.nn.Module:
    """The README's model: 20 features, 2 classes."""
    return torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))


def _fine_tuned_posterior(base: torch.nn.Module, seed: int) -> ivon_fast.Posterior:
    """The posterior of a copy of ``base`` after two official-loop steps (seeded data)."""
    model = _mlp()
    model.load_state_dict(base.state_dict())
    optimizer = ivon_fast.IVON(model.parameters(), lr=0.1, ess=64, seed=seed)
    for x, y in DataLoader(_classification_data(32, 20, 2, seed), batch_size=16):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    return optimizer.posterior(model)  # named: merge and as_prior align by name


def basic() -> dict:
    """README, docs/usage.md, docs/FAULTS.md: ``model``, its data (``train_set``, ``loader``, one
    batch ``x, y``, ``test_loader``), an ``optimizer`` (also ``opt``) over ``model``, the
    constructor's ``lr`` and ``ess``, and posteriors to merge or to use as a prior."""
    torch.manual_seed(0)
    train_set = _classification_data(64, 20, 2, seed=1)
    loader = DataLoader(train_set, batch_size=16, shuffle=True)
    x, y = next(iter(loader))
    model = _mlp()
    optimizer = ivon_fast.IVON(model.parameters(), lr=0.1, ess=len(train_set))
    return dict(
        torch=torch, train_set=train_set, loader=loader, x=x, y=y, model=model,
        test_loader=DataLoader(_classification_data(32, 20, 2, seed=2), batch_size=16),
        optimizer=optimizer, opt=optimizer, lr=0.1, ess=len(train_set),
        posterior_a=_fine_tuned_posterior(model, seed=3),
        posterior_b=_fine_tuned_posterior(model, seed=4),
        posterior_task1=_fine_tuned_posterior(model, seed=5), n_task2=32)


class _Tokens(torch.utils.data.Dataset):
    """Random token sequences for a causal language model (the labels are the inputs)."""

    def __init__(self, count: int, vocab: int, length: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (count, length), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


def hugging_face() -> dict:
    """docs/hf.md, docs/frameworks.md: a 2-layer GPT-2 ``model`` built from a config (nothing is
    downloaded) and its ``train_set`` / ``eval_set`` of token sequences."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    vocab, length = 24, 8
    config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=vocab,
                                     n_positions=length, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    model.loss_type = "ForCausalLM"  # docs/hf.md, "GPT-2's loss normalization"
    return dict(torch=torch, model=model, train_set=_Tokens(16, vocab, length, seed=1),
                eval_set=_Tokens(8, vocab, length, seed=2))


def lightning() -> dict:
    """docs/lightning.md: 8x8 images as 64 features with 10 classes (``train_set`` and its
    ``train_loader``, ``val_loader``, ``test_loader``); the page defines its own module."""
    pytest.importorskip("lightning")
    torch.manual_seed(0)
    train_set = _classification_data(64, 64, 10, seed=1)
    return dict(torch=torch, train_set=train_set,
                train_loader=DataLoader(train_set, batch_size=32, shuffle=True),
                val_loader=DataLoader(_classification_data(32, 64, 10, seed=2), batch_size=32),
                test_loader=DataLoader(_classification_data(32, 64, 10, seed=3), batch_size=32))


def _sentence_batches(count: int, vocab: int, seed: int) -> list:
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (4, 6), generator=generator),
             "attention_mask": torch.ones(4, 6, dtype=torch.long),
             "labels": torch.randint(0, 2, (4,), generator=generator)} for _ in range(count)]


def peft() -> dict:
    """docs/peft.md: ``base_model``, a randomly initialized 1-layer BERT classifier (its attention
    has the ``query`` and ``value`` layers the adapters target), and batches of token ids with
    labels (``loader``, ``test_loader``)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("peft")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=2)
    return dict(torch=torch, base_model=transformers.BertForSequenceClassification(config),
                loader=_sentence_batches(2, 100, seed=1),
                test_loader=_sentence_batches(2, 100, seed=2))


# page (relative to the repository) -> its prelude; pages not named here get basic()
PRELUDES = {"docs/hf.md": hugging_face, "docs/frameworks.md": hugging_face,
            "docs/lightning.md": lightning, "docs/peft.md": peft}
