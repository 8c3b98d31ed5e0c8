"""End-to-end training step: a GPT-style transformer trained with IVON (both loops) and AdamW.

    python -m bench.e2e                                  # gpt2-125m on a GPU, tiny on a CPU
    python -m bench.e2e --config tiny --steps 5          # a smoke run (seconds)
    python -m bench.e2e --config gpt2-125m --device cuda --json bench/out/e2e.json

Three contenders train their own copy of the same model (same initial weights, same batches):
  * torch.optim.AdamW(fused=True)                          loss.backward(); step(); zero_grad()
  * ivon_fast.IVON(..., resample_on_step=True), drop-in    loss.backward(); step(); zero_grad()
  * ivon_fast.IVON, the official loop with mc_samples=1    with sampled_params(train=True):
                                                               zero_grad(); loss.backward()
                                                           step()
For each training step it measures the whole step (forward + backward + optimizer) and, apart,
the optimizer's calls (AdamW / drop-in: step and zero_grad; official loop: entering the sample,
zero_grad, leaving the sample, step), synchronizing the device around each timed section on a
GPU (those synchronizations are in every contender's step time: the optimizer's host work cannot
overlap the backward's device work here, as it can in an unsynchronized loop). The contenders take
their steps round by round in turn (the order rotating every round), so a drift of the machine
hits them alike; after the warmup rounds, every step is one measurement, and the table shows min / median / max, the optimizer's share of the step, tokens per second, and the
ratio to AdamW. It prints each contender's first and last training loss, and checks that training
worked: the loss on the first batch, evaluated again after the last step (IVON at its mean), must
be below that batch's loss at the first step (the data is a learnable synthetic Markov chain,
bench/gpt.py); otherwise the column says DID NOT FALL and the exit status is 1.

Model (bench/gpt.py): GPT-2's architecture, pre-LayerNorm, no biases, LM head tied to the token
embedding, causal attention through scaled_dot_product_attention. On a GPU the forward runs under
bf16 autocast with fp32 params (the IVON paper's GPT-2 recipe); on a CPU in fp32.

Hyperparameters: IVON as in the paper's GPT-2 runs (team-approx-bayes/ivon-experiments,
gpt2/train_ivon.py: lr 300 peak, hess_init 1e-3, ess 1e10, clip_radius 1e-3, weight_decay 1e-6,
beta2 0.99999), AdamW as in nanoGPT (lr 6e-4, betas (0.9, 0.95), weight_decay 0.1), both at their
peak learning rate without warmup or schedule, and without gradient-norm clipping. They do not
change the cost of a step; they only make the loss check meaningful.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

import torch

import ivon_fast
from bench.gpt import CONFIGS, GPT, markov_batches

DEFAULT_BATCH = {"tiny": 8, "gpt2-125m": 16}
ADAMW = dict(lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1)
IVON = dict(lr=300.0, ess=1e10, hess_init=1e-3, beta2=0.99999, weight_decay=1e-6,
            clip_radius=1e-3)


class Clock:
    """Wall time of the optimizer's sections within one training step."""

    def __init__(self, device: torch.device):
        self.device = device
        self.optimizer_seconds = 0.0

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type != "cpu":
            getattr(torch, self.device.type).synchronize()

    @contextlib.contextmanager
    def optimizer(self):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.optimizer_seconds += time.perf_counter() - start


class Contender:
    """One optimizer training its own copy of the model."""

    def __init__(self, name: str, model: GPT, autocast: bool, device: torch.device):
        self.name, self.model, self.autocast, self.device = name, model, autocast, device
        self.backend = "-"
        self.losses, self.step_seconds, self.optimizer_seconds = [], [], []

    def loss(self, tokens, targets) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(tokens, targets)

    def train_step(self, tokens, targets, clock: Clock) -> torch.Tensor:
        """The AdamW-style step: backward, then the optimizer's step and zero_grad."""
        loss = self.loss(tokens, targets)
        loss.backward()
        with clock.optimizer():
            self.optimizer.step()
            self.optimizer.zero_grad()
        return loss

    def holding_mean(self):
        """A context in which the params hold the trained weights (IVON: the mean)."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def evaluate(self, tokens, targets) -> float:
        with self.holding_mean():
            return self.loss(tokens, targets).item()


class AdamWFused(Contender):
    def __init__(self, model, autocast, device):
        super().__init__("torch AdamW(fused=True)", model, autocast, device)
        self.optimizer = torch.optim.AdamW(model.parameters(), fused=True, **ADAMW)


class IVONDropIn(Contender):
    def __init__(self, model, autocast, device, backend, seed):
        super().__init__("ivon_fast drop-in (resample_on_step)", model, autocast, device)
        self.optimizer = ivon_fast.IVON(model.parameters(), backend=backend, seed=seed,
                                        resample_on_step=True, **IVON)
        self.backend = ",".join(sorted(set(self.optimizer.backends.values())))

    def holding_mean(self):
        return self.optimizer.mean_params()


class IVONOfficial(Contender):
    def __init__(self, model, autocast, device, backend, seed):
        super().__init__("ivon_fast official loop (mc=1)", model, autocast, device)
        self.optimizer = ivon_fast.IVON(model.parameters(), backend=backend, seed=seed,
                                        mc_samples=1, **IVON)
        self.backend = ",".join(sorted(set(self.optimizer.backends.values())))

    def holding_mean(self):
        return self.optimizer.mean_params()

    def train_step(self, tokens, targets, clock):
        # for _ in range(mc_samples): with sampled_params(train=True): zero_grad(); backward()
        # step(), with the optimizer's calls timed apart from the forward and backward
        sample = self.optimizer.sampled_params(train=True)
        with clock.optimizer():
            sample.__enter__()
            self.optimizer.zero_grad()
        try:
            loss = self.loss(tokens, targets)
            loss.backward()
        except BaseException:
            if not sample.__exit__(*sys.exc_info()):
                raise
        with clock.optimizer():
            sample.__exit__(None, None, None)
            self.optimizer.step()
        return loss


def build(args, device: torch.device) -> list:
    config = CONFIGS[args.config]
    torch.manual_seed(args.seed)
    initial = GPT(config).to(device)  # initialised on the CPU: the same weights on every device

    def model():
        return copy.deepcopy(initial)
    autocast = args.autocast == "bf16" or (args.autocast == "auto" and device.type == "cuda")
    contenders = [AdamWFused(model(), autocast, device),
                  IVONDropIn(model(), autocast, device, args.backend, args.seed),
                  IVONOfficial(model(), autocast, device, args.backend, args.seed)]
    return contenders


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls, as the recipe
    config = CONFIGS[args.config]
    batch = args.batch or DEFAULT_BATCH[args.config]
    contenders = build(args, device)
    rounds = args.warmup + args.steps
    batches = [(x.to(device), y.to(device)) for x, y in
               markov_batches(config, batch, min(rounds, args.pool), seed=args.seed)]
    clock = Clock(device)
    progress = not args.quiet and sys.stderr.isatty()
    start = time.perf_counter()
    for step in range(rounds):
        shift = step % len(contenders)
        tokens, targets = batches[step % len(batches)]
        for contender in contenders[shift:] + contenders[:shift]:
            clock.optimizer_seconds = 0.0
            clock.sync()
            began = time.perf_counter()
            loss = contender.train_step(tokens, targets, clock)
            clock.sync()
            seconds = time.perf_counter() - began
            contender.losses.append(loss.item())
            if step >= args.warmup:
                contender.step_seconds.append(seconds)
                contender.optimizer_seconds.append(clock.optimizer_seconds)
        if progress:
            print(f"\r# round {step + 1}/{rounds} ({'warmup' if step < args.warmup else 'timed'})"
                  f", {time.perf_counter() - start:.0f} s", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)

    tokens_per_step = batch * config.context
    rows = []
    for contender in contenders:
        steps, opts = contender.step_seconds, contender.optimizer_seconds
        first, last = contender.losses[0], contender.losses[-1]
        # the check: the loss on the first batch, before any update (the first training loss;
        # IVON's at a sample, whose noise is tiny at ess 1e10) and after training (IVON: the mean)
        after = contender.evaluate(*batches[0])
        rows.append(dict(
            optimizer=contender.name, backend=contender.backend,
            step_ms=spread(steps, 1e3), optimizer_ms=spread(opts, 1e3),
            optimizer_share=statistics.median(o / s for o, s in zip(opts, steps)),
            tokens_per_s=dict(min=tokens_per_step / max(steps),
                              median=tokens_per_step / statistics.median(steps),
                              max=tokens_per_step / min(steps)),
            first_loss=first, last_loss=last, first_batch_loss_after=after,
            loss_fell=bool(math.isfinite(after) and after < first),
            losses=contender.losses))
    adamw = rows[0]
    for row in rows:
        row["step_vs_adamw"] = row["step_ms"]["median"] / adamw["step_ms"]["median"]
        row["optimizer_vs_adamw"] = (row["optimizer_ms"]["median"]
                                     / adamw["optimizer_ms"]["median"])
    return dict(config=dict(name=args.config, **vars(config), params=config.params), batch=batch,
                tokens_per_step=tokens_per_step, warmup=args.warmup, steps=args.steps,
                autocast="bf16" if contenders[0].autocast else "none",
                param_dtype="float32", hyperparameters=dict(adamw=ADAMW, ivon=IVON), rows=rows)


def spread(values, scale: float) -> dict:
    return dict(min=min(values) * scale, median=statistics.median(values) * scale,
                max=max(values) * scale)


def environment(device: torch.device) -> dict:
    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name")), cpu)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(os.path.abspath(__file__)),
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else cpu,
        cpu=cpu, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        versions=dict(ivon_fast=ivon_fast.__version__, torch=torch.__version__,
                      cuda=torch.version.cuda, triton=version("triton"),
                      python=platform.python_version(), git_commit=commit),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def print_table(result: dict, env: dict) -> None:
    config = result["config"]
    print(f"# ivon_fast {env['versions']['ivon_fast']} | torch {env['versions']['torch']} | "
          f"{env['device']}: {env['device_name']} | {env['cpu_count']} CPUs | {env['date']}")
    print(f"# {config['name']}: {config['layers']} layers, width {config['width']}, "
          f"{config['heads']} heads, context {config['context']}, vocab {config['vocab']}, "
          f"{config['params'] / 1e6:.2f}M params (tied head) | batch {result['batch']} x "
          f"{config['context']} = {result['tokens_per_step']} tokens | autocast "
          f"{result['autocast']}, fp32 params | {result['steps']} timed steps after "
          f"{result['warmup']} warmup, min/median/max")
    print(f"{'optimizer':<38} {'backend':<8} {'step ms':>22} {'optimizer ms':>22} {'opt%':>5} "
          f"{'tokens/s':>9} {'x AdamW':>7} {'opt x AdamW':>11}  loss first -> last  batch 0")
    for row in result["rows"]:
        step, opt = row["step_ms"], row["optimizer_ms"]
        print(f"{row['optimizer']:<38} {row['backend']:<8} "
              f"{fmt3(step['min'], step['median'], step['max']):>22} "
              f"{fmt3(opt['min'], opt['median'], opt['max']):>22} "
              f"{100 * row['optimizer_share']:>5.1f} {row['tokens_per_s']['median']:>9.0f} "
              f"{row['step_vs_adamw']:>7.3f} {row['optimizer_vs_adamw']:>11.2f}  "
              f"{row['first_loss']:.3f} -> {row['last_loss']:.3f} "
              f"{row['first_batch_loss_after']:>8.3f}{'' if row['loss_fell'] else ' DID NOT FALL'}")


def fmt3(low: float, middle: float, high: float) -> str:
    digits = 3 if high < 10 else 2 if high < 100 else 1
    return f"{low:.{digits}f}/{middle:.{digits}f}/{high:.{digits}f}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(CONFIGS),
                        default="gpt2-125m" if cuda else "tiny",
                        help="model size (default: gpt2-125m on a GPU, tiny on a CPU)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per optimizer (default 30 on a GPU, 50 on a CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first rounds (default 3)")
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--batch", type=int, default=None,
                        help="sequences per step (default: tiny 8, gpt2-125m 16)")
    parser.add_argument("--backend", default="auto", help="ivon_fast backend (default auto)")
    parser.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto",
                        help="bf16 autocast of the forward (default: on GPUs only)")
    parser.add_argument("--seed", type=int, default=0, help="model, data and noise seed")
    parser.add_argument("--pool", type=int, default=16,
                        help="distinct batches, cycled (default 16)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress line (shown on a terminal only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.steps is None:
        args.steps = 30 if device.type == "cuda" else 50
    if args.steps < 1 or args.warmup < 0 or args.pool < 1:
        parser.error("--steps and --pool must be at least 1, --warmup at least 0")
    env = environment(device)
    result = run(args)
    print_table(result, env)
    failed = [row["optimizer"] for row in result["rows"] if not row["loss_fell"]]
    if args.json:
        record = dict(env, command=" ".join(["python", "-m", "bench.e2e"]
                                            + [shlex.quote(a) for a in argv]), **result)
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as handle:
            json.dump(record, handle, indent=1)
        print(f"# wrote {args.json}")
    if failed:
        print(f"# the training loss did not fall for: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
