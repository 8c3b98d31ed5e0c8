"""Train a small CNN on scikit-learn's 8x8 digits with IVON under PyTorch Lightning, then score
its predictions at the posterior mean and averaged over posterior samples.

    python examples/image_classifier_lightning.py                 # about a minute on a CPU
    python examples/image_classifier_lightning.py --mode official --samples 32

The digits (1797 images, 10 classes) ship with scikit-learn: nothing is downloaded. The
``IVONCallback`` makes Lightning's validation run at the posterior mean; afterwards
``ivon_fast.predictive`` gives the class probabilities at the mean and the Bayesian model
average over K samples, and their accuracy, NLL, expected calibration error and Brier score.
The same script runs on a GPU (``accelerator='auto'``). On a small, busy CPU machine
``OMP_NUM_THREADS=1`` can be much faster: the model is too small to gain from threads.
"""
import argparse

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits

import ivon_fast
from ivon_fast.integrations.lightning import IVONCallback
from ivon_fast.predictive import calibration, predict


def digits(seed: int, test_fraction: float = 0.25) -> tuple:
    """(train, test) TensorDatasets of 1x8x8 images scaled to [0, 1], split at random."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = int(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return (torch.utils.data.TensorDataset(images[train], labels[train]),
            torch.utils.data.TensorDataset(images[test], labels[test]))


def small_cnn(width: int) -> torch.nn.Module:
    """Two 3x3 convolutions, a 2x2 max-pool and a linear layer: 8x8 images to 10 logits."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.MaxPool2d(2), torch.nn.Flatten(),
        torch.nn.Linear(2 * width * 4 * 4, 10))


class DigitClassifier(pl.LightningModule):
    """The CNN with IVON in automatic optimization.

    Args:
        width (int): channels of the first convolution.
        train_size (int): IVON's effective sample size ``ess``.
        lr (float): IVON's learning rate.
        hess_init (float): IVON's initial Hessian estimate (sets the initial posterior spread).
        mode (str): 'dropin' (``resample_on_step=True``: the params hold a posterior sample, one
            fused pass per step) or 'official' (``step(closure)`` samples around the mean).
        seed (int): IVON's noise seed.
    """

    def __init__(self, width: int, train_size: int, lr: float, hess_init: float, mode: str,
                 seed: int):
        super().__init__()
        self.net = small_cnn(width)
        self.train_size, self.lr, self.hess_init = train_size, lr, hess_init
        self.mode, self.seed = mode, seed
        self.correct = self.seen = 0

    def forward(self, images):
        return self.net(images)

    def configure_optimizers(self):
        return ivon_fast.IVON(self.parameters(), lr=self.lr, ess=self.train_size,
                              hess_init=self.hess_init, weight_decay=1e-4, seed=self.seed,
                              resample_on_step=(self.mode == "dropin"))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch  # the callback put the posterior mean into the params
        self.correct += int((self(images).argmax(1) == labels).sum())
        self.seen += len(labels)

    def on_validation_epoch_end(self):
        if not self.trainer.sanity_checking:
            print(f"epoch {self.current_epoch + 1:3d}: validation accuracy at the mean "
                  f"{self.correct / self.seen:.4f}")
        self.correct = self.seen = 0


def main(argv=None) -> dict:
    """Train, then return {'mean': scores, 'samples=K': scores} (see ivon_fast.predictive)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40, help="training epochs (default 40)")
    parser.add_argument("--samples", type=int, default=16,
                        help="posterior samples K of the predictive average (default 16)")
    parser.add_argument("--width", type=int, default=16,
                        help="channels of the first convolution (default 16)")
    parser.add_argument("--batch-size", type=int, default=64, help="default 64")
    parser.add_argument("--lr", type=float, default=0.5, help="IVON's lr (default 0.5)")
    parser.add_argument("--hess-init", type=float, default=1.0,
                        help="IVON's hess_init (default 1.0)")
    parser.add_argument("--mode", choices=["dropin", "official"], default="dropin",
                        help="IVON's training loop (default dropin)")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    args = parser.parse_args(argv)
    if args.epochs < 1 or args.samples < 1 or args.width < 1 or args.batch_size < 1:
        parser.error("--epochs, --samples, --width and --batch-size must be >= 1")

    pl.seed_everything(args.seed, verbose=False)
    train_set, test_set = digits(args.seed)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size,
                                               shuffle=True)
    # predict() passes over the test set once per sample: same order every time
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=256, shuffle=False)

    model = DigitClassifier(args.width, len(train_set), args.lr, args.hess_init, args.mode,
                            args.seed)
    trainer = pl.Trainer(accelerator="auto", devices=1, max_epochs=args.epochs,
                         callbacks=[IVONCallback()], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, check_val_every_n_epoch=max(1, args.epochs // 5))
    trainer.fit(model, train_loader, test_loader)

    optimizer = trainer.optimizers[0]
    results = {}
    for samples in (0, args.samples):
        probs, targets = predict(model, optimizer, test_loader, samples=samples,
                                 seed=args.seed, progress=False)
        results["mean" if samples == 0 else f"samples={samples}"] = calibration(probs, targets)

    print(f"\n{len(test_set)} test images, IVON {args.mode} mode, {args.epochs} epochs")
    print(f"{'prediction':<14}{'accuracy':>10}{'NLL':>10}{'ECE':>10}{'Brier':>10}")
    for name, scores in results.items():
        print(f"{name:<14}{scores['accuracy']:>10.4f}{scores['nll']:>10.4f}"
              f"{scores['ece']:>10.4f}{scores['brier']:>10.4f}")
    return results


if __name__ == "__main__":
    main()
