"""Helpers shared by the studies in docs/studies (blr.py, calibration.py, ood.py).

Each study is a script: ``python docs/studies/<name>.py [--quick] [--out DIR]``. It prints a markdown
table, and writes a JSON of its numbers and its PNG(s) next to itself (or into ``--out``).
``docs/EVIDENCE.md`` holds the tables and embeds the PNGs.

What lives here: the common command-line flags, the markdown/JSON output, and, for the two
classification studies, the data (scikit-learn's bundled ``load_digits``: offline), the MLP, and
the AdamW and IVON training loops, so that both studies train their models the same way.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------- command line, output

def parser(description: str) -> argparse.ArgumentParser:
    """An ArgumentParser with the flags every study has (--quick, --out, --threads)."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="a < 30 s smoke run (the CI test): fewer seeds and steps; its numbers are "
                        "not the evidence")
    p.add_argument("--out", type=Path, default=HERE,
                   help="folder for the JSON and PNG outputs (default: next to the script)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the models are tiny and the machine "
                        "is shared; more threads only add overhead here)")
    return p


def setup(args) -> None:
    """Apply the common flags: thread count, output folder, a non-interactive plot backend."""
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")


def environment() -> dict:
    """What ran the study (goes into every JSON)."""
    import ivon_fast
    return {"date": datetime.date.today().isoformat(), "python": platform.python_version(),
            "torch": torch.__version__, "ivon_fast": ivon_fast.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads()}


def write_json(path: Path, record: dict, compact: bool = False) -> None:
    """``compact``: one line, for records with long per-step series."""
    with open(path, "w") as file:
        json.dump(record, file, default=float, **({"separators": (",", ":")} if compact
                                                  else {"indent": 1}))
        file.write("\n")


def save(args, study: str, fig, results: dict, *, dpi: int = 110, compact: bool = False) -> dict:
    """Write a study's figure and record into ``args.out``: ``<study>.png`` (``fig``, then closed)
    and ``<study>.json``, which holds the study's name, its arguments and ``environment()``
    before ``results``. Returns the record."""
    import matplotlib.pyplot as plt

    png, path = args.out / f"{study}.png", args.out / f"{study}.json"
    fig.savefig(png, dpi=dpi)
    plt.close(fig)
    record = {"study": study, "args": {k: (str(v) if isinstance(v, Path) else v)
                                       for k, v in vars(args).items()},
              "environment": environment(), **results}
    write_json(path, record, compact=compact)
    print(f"\nwrote {png} and {path}")
    return record


def markdown_table(headers: list, rows: list) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def mean_std(values) -> tuple:
    """(mean, sample std) of a list of floats; std 0 for a single value."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def pm(values, digits: int = 3) -> str:
    """'mean ± std' of a list of floats, for the tables."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------------------- classification data

# The hyperparameter grids of calibration.py and ood.py, searched by validation NLL (3x3 each).
# AdamW: the usual range of learning rates and decoupled weight decays for a small MLP.
# IVON: the paper's guidance for small networks (lr ~0.1-1, hess_init ~0.1-1 and one step above),
# with ess = the training set size, beta2 = 0.99999 and one MC sample per step fixed.
ADAMW_GRID = {"lr": [1e-3, 3e-3, 1e-2], "weight_decay": [1e-4, 1e-2, 1e-1]}
IVON_GRID = {"lr": [0.2, 0.5, 1.0], "hess_init": [0.3, 1.0, 3.0]}
IVON_FIXED = {"beta2": 0.99999, "weight_decay": 1e-4, "mc_samples": 1}


def digits_splits(seed: int, classes=None, val_fraction: float = 0.2, test_fraction: float = 0.3):
    """scikit-learn's bundled 8x8 digits (1797 images, 64 features, 10 classes; no download),
    split into train / validation / test, stratified, by ``seed``.

    Features are scaled to [0, 1] (pixel values are 0..16). ``classes``: keep only these labels,
    relabelled 0..len(classes)-1 in the given order (the OOD study trains on digits 0-4).
    Returns a dict of (x float32 [n, 64], y int64 [n]) pairs: 'train', 'val', 'test', and 'rest'
    (the images of the other classes, all of them; empty when ``classes`` is None).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    rest = (x[:0], y[:0])
    if classes is not None:
        keep = torch.isin(y, torch.tensor(classes))
        rest = (x[~keep], y[~keep])
        x, y = x[keep], y[keep]
        relabel = {c: i for i, c in enumerate(classes)}
        y = torch.tensor([relabel[int(v)] for v in y])
    index = list(range(len(y)))
    train_val, test = train_test_split(index, test_size=test_fraction, random_state=seed,
                                       stratify=y.numpy())
    train, val = train_test_split(train_val, test_size=val_fraction / (1 - test_fraction),
                                  random_state=seed, stratify=y[train_val].numpy())
    pick = lambda idx: (x[idx], y[idx])  # noqa: E731
    return {"train": pick(train), "val": pick(val), "test": pick(test), "rest": rest}


def flip_labels(y: torch.Tensor, fraction: float, classes: int, seed: int) -> torch.Tensor:
    """A copy of ``y`` with ``fraction`` of the labels replaced by a different class, uniformly
    (symmetric label noise; the flipped examples are chosen and relabelled by ``seed``)."""
    if fraction <= 0:
        return y.clone()
    g = torch.Generator().manual_seed(10_000 + seed)
    y = y.clone()
    flipped = torch.randperm(len(y), generator=g)[: round(fraction * len(y))]
    shift = torch.randint(1, classes, (len(flipped),), generator=g)  # never the same class
    y[flipped] = (y[flipped] + shift) % classes
    return y


def mlp(inputs: int, classes: int, hidden: int, seed: int) -> torch.nn.Module:
    """The classifier of both studies: two hidden ReLU layers."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, classes))


def batches(x, y, batch_size: int, generator: torch.Generator):
    """One epoch of shuffled minibatches (the last one may be smaller)."""
    order = torch.randperm(len(y), generator=generator)
    for start in range(0, len(y), batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


def loader(x, y, batch_size: int = 512):
    """A fixed-order loader for evaluation (``ivon_fast.predictive.predict`` passes over it once
    per posterior sample and needs the same order each time)."""
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                       batch_size=batch_size, shuffle=False)


def cosine(base: float, step: int, total: int) -> float:
    """Cosine decay from ``base`` to 0 over ``total`` steps (both optimizers use it)."""
    return base * 0.5 * (1 + math.cos(math.pi * step / total))


def cosine_batches(opt, x, y, *, epochs: int, batch_size: int, lr: float, seed: int):
    """The minibatches of ``epochs`` epochs (shuffled by a generator seeded with ``seed``), each
    after setting every group's lr to its cosine decay from ``lr``: the schedule and batches both
    optimizers train with."""
    g = torch.Generator().manual_seed(seed)
    total, step = epochs * math.ceil(len(y) / batch_size), 0
    for _ in range(epochs):
        for xb, yb in batches(x, y, batch_size, g):
            for group in opt.param_groups:
                group["lr"] = cosine(lr, step, total)
            yield xb, yb
            step += 1


def train_adamw(model, x, y, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                seed: int):
    """AdamW with a cosine learning-rate decay; returns the model (trained in place)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    model.train()
    for xb, yb in cosine_batches(opt, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                                 seed=seed):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return model


def train_ivon(model, x, y, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
               hess_init: float, beta2: float, mc_samples: int, seed: int, ess=None):
    """IVON (ivon_fast) in the official loop, with the same cosine decay and batches as AdamW.

    ess is the training set size (the paper's choice: the loss is a mean over a minibatch, and
    ess scales it up to the whole data set). Returns the optimizer (the model holds its mean).
    """
    from ivon_fast import IVON

    opt = IVON(model.parameters(), lr=lr, ess=float(ess or len(y)), hess_init=hess_init,
               beta2=beta2, weight_decay=weight_decay, mc_samples=mc_samples, seed=seed)
    model.train()
    for xb, yb in cosine_batches(opt, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                                 seed=seed):
        for _ in range(mc_samples):
            with opt.sampled_params(train=True):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    return opt


def hess_summary(opt) -> dict:
    """Quantiles of IVON's Hessian estimate and posterior std over all weights after training:
    how far h moved from hess_init (with beta2 = 0.99999 and ~1000 steps: by under 1%)."""
    hess = torch.cat([opt.state[p]["hess"].flatten() for g in opt.param_groups
                      for p in g["params"]])
    std = torch.cat([s.flatten() for s in opt.posterior().std])
    q = torch.tensor([0.0, 0.01, 0.5, 0.99, 1.0])
    return {"quantiles": q.tolist(), "hess": hess.quantile(q).tolist(),
            "std": std.quantile(q).tolist()}


@torch.no_grad()
def softmax_probs(model, x) -> torch.Tensor:
    """A deterministic network's class probabilities (AdamW's predictive)."""
    model.eval()
    return torch.softmax(model(x), dim=1)


def ivon_probs(model, opt, x, y, samples: int, seed: int) -> torch.Tensor:
    """IVON's predictive: at the posterior mean (samples=0), or softmax probabilities averaged
    over ``samples`` posterior samples (``ivon_fast.predictive.predict``)."""
    from ivon_fast.predictive import predict

    probs, targets = predict(model, opt, loader(x, y), samples=samples, seed=seed,
                             progress=False)
    assert torch.equal(targets, y)
    return probs
