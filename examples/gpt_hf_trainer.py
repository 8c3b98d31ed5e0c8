"""A tiny GPT-style character language model trained with IVON through the Hugging Face Trainer.

IVON runs in its drop-in mode (``resample_on_step=True``): the Trainer's own loop (backward,
gradient clipping, ``step()``, ``zero_grad()``, LR schedule) trains it as it would AdamW, each
forward running at a fresh posterior sample. ``IVONCallback`` makes the evaluations and the saved
model use the posterior mean, and with ``eval_samples=K`` the evaluation averages the predictive
over K posterior samples. Everything is built here: the text (sentences from a small random
grammar, so held-out sentences follow the same rules), a character-level tokenizer, and a 2-layer
GPT-2 from a config. Nothing is downloaded.

    python examples/gpt_hf_trainer.py                     # well under a minute on a laptop CPU
    python examples/gpt_hf_trainer.py --bf16              # bf16 autocast where available

The Trainer picks the device (a GPU when there is one; ``--cpu`` forces the CPU).
"""
from __future__ import annotations

import argparse
import math
import random
import tempfile

import torch

from ivon_fast import IVON
from ivon_fast.integrations.hf import IVONCallback

NAMES = ["alice", "the white rabbit", "the queen", "the old cat", "a small bird", "my sister",
         "the mad hatter"]
VERBS = ["sees", "chases", "finds", "follows", "watches", "calls", "forgets"]
ENDINGS = [".", " today.", " again.", " in the garden.", " by the river.", " after tea."]


def sentences(count: int, seed: int) -> str:
    """``count`` sentences "<name> <verb> <name><ending>" drawn at random."""
    pick = random.Random(seed).choice
    return " ".join(f"{pick(NAMES)} {pick(VERBS)} {pick(NAMES)}{pick(ENDINGS)}"
                    for _ in range(count))


class Blocks(torch.utils.data.Dataset):
    """Windows of ``block`` characters, every ``stride`` characters; the labels are the inputs
    (the model shifts them: position t predicts character t + 1)."""

    def __init__(self, ids: torch.Tensor, block: int, stride: int):
        self.windows = ids.unfold(0, block, stride)

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, index):
        return {"input_ids": self.windows[index], "labels": self.windows[index]}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-steps", type=int, default=400, help="optimizer steps (400)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per step (16)")
    parser.add_argument("--block", type=int, default=32, help="characters per window (32)")
    # IVON's lr is in SGD's units (the step is about lr * momentum while the Hessian estimate
    # is near hess_init), so it is far larger than AdamW's
    parser.add_argument("--lr", type=float, default=5.0, help="IVON's learning rate (5.0)")
    parser.add_argument("--hess-init", type=float, default=1.0, help="IVON's hess_init (1.0)")
    # the run is short: let the Hessian estimate follow within ~1000 steps (ivon-opt's default
    # 0.99999 suits runs of 10^5 steps)
    parser.add_argument("--beta2", type=float, default=0.999, help="IVON's beta2 (0.999)")
    parser.add_argument("--eval-steps", type=int, default=100,
                        help="evaluate at the mean every this many steps (100)")
    parser.add_argument("--eval-samples", type=int, default=8,
                        help="posterior samples of the final predictive evaluation (8)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast where available")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even with a GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default=None,
                        help="where the Trainer writes (default: a new temporary folder)")
    return parser.parse_args(argv)


def bf16_available(use_cpu: bool) -> bool:
    if torch.cuda.is_available() and not use_cpu:
        return torch.cuda.is_bf16_supported()
    return True  # CPU autocast supports bf16 (slowly on CPUs without bf16 instructions)


def main(argv=None) -> dict:
    # imported here, so that the grammar above imports without transformers
    # (docs/studies/bf16_state.py trains on it)
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    options = parse(argv)
    torch.manual_seed(options.seed)

    # a character-level tokenizer over 400 training and 40 held-out sentences
    train_text, eval_text = sentences(400, seed=0), sentences(40, seed=1)
    vocabulary = sorted(set(train_text + eval_text))

    def encode(text):
        return torch.tensor([vocabulary.index(c) for c in text])

    train_set = Blocks(encode(train_text), options.block, stride=max(1, options.block // 2))
    eval_set = Blocks(encode(eval_text), options.block, stride=options.block)

    bf16 = options.bf16 and bf16_available(options.cpu)
    if options.bf16 and not bf16:
        print("bf16 is not available on this device: training in fp32")
    args = TrainingArguments(
        output_dir=options.output_dir or tempfile.mkdtemp(prefix="ivon_gpt_hf_"),
        max_steps=options.max_steps, per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=64, lr_scheduler_type="cosine",
        warmup_steps=options.max_steps // 20, max_grad_norm=1.0, eval_strategy="steps",
        eval_steps=options.eval_steps, save_strategy="no", logging_steps=options.eval_steps,
        report_to=[], disable_tqdm=True, use_cpu=options.cpu, bf16=bf16, seed=options.seed)

    config = GPT2Config(vocab_size=len(vocabulary), n_positions=options.block, n_embd=32,
                        n_layer=2, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    # build the optimizer over the params where they will train (the Trainer's device)
    model = GPT2LMHeadModel(config).to(args.device)
    # transformers leaves GPT2LMHeadModel's loss_type unset; the Trainer then normalizes the
    # loss by every label token, the first one (which nothing predicts) included
    model.loss_type = "ForCausalLM"
    # ess: the number of training examples; every character is one prediction
    optimizer = IVON(model.parameters(), lr=options.lr, ess=float(len(train_text)),
                     hess_init=options.hess_init, beta2=options.beta2, resample_on_step=True)
    callback = IVONCallback()
    trainer = Trainer(model=model, args=args, train_dataset=train_set, eval_dataset=eval_set,
                      optimizers=(optimizer, None), callbacks=[callback])
    print(f"{sum(p.numel() for p in model.parameters()):,} params, {len(vocabulary)} characters, "
          f"{len(train_set)} training windows, device {args.device}")
    train_loss = trainer.train().training_loss
    last_logged = [e["loss"] for e in trainer.state.log_history if "loss" in e]

    # after training the callback holds the posterior mean in the params
    at_mean = trainer.evaluate()["eval_loss"]
    callback.eval_samples = options.eval_samples
    predictive = trainer.evaluate()["eval_loss"] if options.eval_samples > 0 else at_mean
    callback.eval_samples = 0
    trainer.save_model()  # the mean

    print(f"train loss at posterior samples:   {train_loss:.4f} over the run"
          + (f", {last_logged[-1]:.4f} at the end" if last_logged else ""))
    print(f"eval loss at the posterior mean:   {at_mean:.4f} (perplexity "
          f"{math.exp(at_mean):.2f})")
    if options.eval_samples > 0:
        print(f"eval loss, predictive of {options.eval_samples} samples: {predictive:.4f} "
              f"(perplexity {math.exp(predictive):.2f})")
    print(f"the model at the posterior mean is saved in {args.output_dir}")
    return {"train_loss": train_loss, "eval_loss_mean": at_mean,
            "eval_loss_predictive": predictive}


if __name__ == "__main__":
    main()
