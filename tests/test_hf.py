"""IVON under the real Hugging Face ``Trainer`` (``ivon_fast.integrations.hf``), on CPU, with tiny
models built from configs.

Expectations are independent of the callback: losses computed by hand at ``opt.posterior().mean``
or over evaluation samples regenerated on a copy of the optimizer (loaded from its state dict, so
it draws the same evaluation noise); hand-written training loops (AdamW-style and the official
loop) fed the batches the Trainer used; and the run itself without evaluations, or without the
interruption of a resume.
"""
from __future__ import annotations

import importlib.util
import math
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback,  # noqa: E402
                          TrainingArguments)
from transformers.utils import logging as hf_logging  # noqa: E402

from ivon_fast import IVON  # noqa: E402
from ivon_fast.integrations.hf import IVONCallback, IVONTrainer  # noqa: E402

hf_logging.set_verbosity_error()

# the callback warns when an evaluation or save ran on a posterior sample: a failure here
pytestmark = pytest.mark.filterwarnings("error:IVONCallback:RuntimeWarning")

VOCAB, LENGTH = 24, 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Tokens(torch.utils.data.Dataset):
    """Random token sequences; the labels are the inputs (the model shifts them)."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, VOCAB, (count, LENGTH), generator=generator)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, index):
        return {"input_ids": self.ids[index], "labels": self.ids[index]}


class Points(torch.utils.data.Dataset):
    """Random points with one of three classes."""

    def __init__(self, count: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(count, 6, generator=generator)
        self.labels = torch.randint(0, 3, (count,), generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.labels[index]}


class Classifier(torch.nn.Module):
    """A tiny classifier that is not a transformers model (its loss is computed inline)."""

    def __init__(self, seed: int = 0, loss: str = "cross_entropy"):
        super().__init__()
        torch.manual_seed(seed)
        self.hidden = torch.nn.Linear(6, 16)
        self.out = torch.nn.Linear(16, 3)
        self.loss = loss

    def forward(self, x, labels=None):
        logits = self.out(torch.tanh(self.hidden(x)))
        output = {"logits": logits}
        if labels is not None:
            output["loss"] = (F.cross_entropy(logits, labels) if self.loss == "cross_entropy"
                              else F.mse_loss(logits, F.one_hot(labels, 3).float()))
        return output


def gpt(seed: int = 0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=LENGTH,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    model = GPT2LMHeadModel(config)
    # transformers leaves GPT2LMHeadModel's loss_type unset; the Trainer then normalizes the
    # loss by every label token, the first one (which nothing predicts) included
    model.loss_type = "ForCausalLM"
    return model


def ivon(model, seed: int = 3, **options):
    # ess small: std about 0.07, so a sample's loss is visibly not the mean's
    settings = dict(lr=0.05, ess=200.0, resample_on_step=True, seed=seed)
    settings.update(options)
    return IVON(model.parameters(), **settings)


def arguments(directory, **overrides):
    settings = dict(output_dir=str(directory), per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, max_steps=2, use_cpu=True, report_to=[],
                    logging_steps=1000, disable_tqdm=True, seed=0, eval_strategy="no",
                    save_strategy="no", dataloader_num_workers=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainer_for(model, opt, args, callbacks, train=None, evaluate=None, cls=Trainer,
                scheduler=None, **extra):
    return cls(model=model, args=args, train_dataset=train or Tokens(16, seed=0),
               eval_dataset=evaluate or Tokens(8, seed=1), optimizers=(opt, scheduler),
               callbacks=callbacks, **extra)


def lm_loss(log_probs_or_logits, ids):
    """Causal LM cross-entropy, by hand: position t predicts token t + 1."""
    return F.cross_entropy(log_probs_or_logits[:, :-1].reshape(-1, VOCAB).float(),
                           ids[:, 1:].reshape(-1))


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def load_into(model, tensors):
    with torch.no_grad():
        for param, value in zip(model.parameters(), tensors):
            param.copy_(value)
    return model


def assert_same(a, b, where="state"):
    """Bitwise equality of nested state (tensors, dicts, lists, numbers)."""
    if isinstance(a, torch.Tensor):
        same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        assert same, f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{index}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def eval_losses(trainer):
    return [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]


class Recorder(TrainerCallback):
    """The gradients the optimizer receives (after the Trainer's clipping)."""

    def __init__(self):
        self.grads = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters()])


class RecordingCollator:
    """The Trainer's batches, in the order it used them."""

    def __init__(self):
        self.batches = []

    def __call__(self, features):
        batch = transformers.default_data_collator(features)
        self.batches.append({k: v.clone() for k, v in batch.items()})
        return batch


def inverse_time(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1.0 + step))


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["steps", "epoch"])
def test_evaluation_and_checkpoints_use_the_mean(tmp_path, strategy):
    """The phase opens in on_step_end (steps) or on_epoch_end (epoch; 4 steps are one epoch)."""
    model = gpt()
    opt = ivon(model)
    callback = IVONCallback()
    if strategy == "steps":
        steps, every = 2, dict(eval_steps=2, save_steps=2)
    else:
        steps, every = 4, {}
    args = arguments(tmp_path, max_steps=steps, eval_strategy=strategy, save_strategy=strategy,
                     **every)
    trainer = trainer_for(model, opt, args, [callback])
    trainer.train()

    # the callback holds the mean after training
    posterior = opt.posterior()
    assert_same(params_of(model), posterior.mean)

    # the evaluation after the last step ran at the mean: the loss by hand there
    ids = Tokens(8, seed=1).ids
    at_mean = load_into(gpt(seed=9), posterior.mean)
    with torch.no_grad():
        by_hand = lm_loss(at_mean(ids).logits, ids).item()
    [logged] = eval_losses(trainer)
    # the Trainer sums the token losses and divides by their count; by hand takes their mean
    assert logged == pytest.approx(by_hand, rel=1e-5)
    assert trainer.evaluate()["eval_loss"] == logged  # after training: the mean still

    # the checkpoint's model file and save_model() after training hold the mean
    trainer.save_model(str(tmp_path / "final"))
    names = [name for name, _ in model.named_parameters()]
    for folder in (f"checkpoint-{steps}", "final"):
        saved = safetensors_torch.load_file(str(tmp_path / folder / "model.safetensors"))
        assert_same([saved[name] for name in names], posterior.mean, folder)

    # release(): the params hold the training sample again, which is not the mean, and its
    # loss is visibly not the mean's (the test could not tell them apart otherwise)
    callback.release()
    sample = params_of(model)
    assert not any(torch.equal(s, m) for s, m in zip(sample, posterior.mean))
    with torch.no_grad():
        assert abs(lm_loss(model(ids).logits, ids).item() - by_hand) > 1e-3


def test_evaluations_and_saves_do_not_change_training(tmp_path):
    runs = []
    # run 0 evaluates at the start, after each step, and saves every 2 steps and at the end;
    # run 1 never does
    for index, settings in enumerate([
            dict(eval_on_start=True, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                 save_steps=2),
            dict()]):
        model = gpt()
        opt = ivon(model)
        callback = IVONCallback(eval_samples=2 if index == 0 else 0)
        trainer = trainer_for(model, opt, arguments(tmp_path / str(index), max_steps=3,
                                                    **settings), [callback])
        trainer.train()
        state = opt.state_dict()
        callback.release()
        runs.append((params_of(model), state))
    assert sorted(os.listdir(tmp_path / "0")) == ["checkpoint-2", "checkpoint-3"]
    assert not os.path.exists(tmp_path / "1") or not os.listdir(tmp_path / "1")
    (sample_a, state_a), (sample_b, state_b) = runs
    assert_same(sample_a, sample_b, "the training sample")
    assert state_a["ivon"]["next_eval_draw"] == 4 * 2  # four evaluations, one batch, K = 2
    state_a["ivon"].pop("next_eval_draw")
    state_b["ivon"].pop("next_eval_draw")
    for group in state_a["param_groups"] + state_b["param_groups"]:
        group["ivon"].pop("next_eval_draw")
    assert_same(state_a, state_b)


def snapshot(model, opt, callback):
    """(params at the mean, the optimizer's state dict, params at the training sample)."""
    mean = params_of(model)  # the callback holds the mean after training
    state = opt.state_dict()
    callback.release()
    return mean, state, params_of(model)


def test_resume_from_checkpoint_is_exact(tmp_path):
    settings = dict(max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                    save_steps=2)
    model = gpt()
    opt = ivon(model)
    callback = IVONCallback(eval_samples=2)
    trainer = trainer_for(model, opt, arguments(tmp_path / "straight", **settings), [callback])
    trainer.train()
    straight = snapshot(model, opt, callback)
    checkpoint = str(tmp_path / "straight" / "checkpoint-2")

    # a new model (other init), optimizer (other seed), callback and Trainer resume at step 2
    model = gpt(seed=1)
    opt = ivon(model, seed=99)
    callback = IVONCallback(eval_samples=2)
    resumed = trainer_for(model, opt, arguments(tmp_path / "resumed", **settings), [callback])
    resumed.train(resume_from_checkpoint=checkpoint)
    # the log carries over from the checkpoint: the evaluation at step 4 is the straight run's
    assert eval_losses(resumed) == eval_losses(trainer)
    assert_same((params_of(model), opt.state_dict()), straight[:2])  # the mean, still held

    # the same Trainer again, its callback holding the mean after training: loading the model
    # checkpoint ends the hold, so that the optimizer can load its state
    resumed.train(resume_from_checkpoint=checkpoint)
    assert_same(snapshot(model, opt, callback), straight)


def test_predictive_evaluation_averages_evaluation_samples(tmp_path):
    model = gpt()
    opt = ivon(model, ess=20.0)  # a wide posterior: the samples' predictions differ clearly
    callback = IVONCallback()
    trainer = trainer_for(model, opt, arguments(tmp_path), [callback])
    trainer.train()
    at_mean = trainer.evaluate()["eval_loss"]

    # a copy of model and optimizer draws the evaluation samples the Trainer will draw
    twin = gpt(seed=5).eval()
    twin_opt = ivon(twin, seed=7, ess=20.0)
    twin.load_state_dict(model.state_dict())
    twin_opt.load_state_dict(opt.state_dict())

    samples = 3
    callback.eval_samples = samples
    ids = Tokens(8, seed=1).ids

    def by_hand():
        log_probs = []
        with torch.no_grad():
            for _ in range(samples):
                with twin_opt.sampled_params():
                    log_probs.append(twin(ids).logits.float().log_softmax(-1))
        return torch.logsumexp(torch.stack(log_probs), 0) - math.log(samples), log_probs

    predictive_loss = trainer.evaluate()["eval_loss"]
    predictive, per_sample = by_hand()
    expected = lm_loss(predictive, ids).item()
    assert predictive_loss == pytest.approx(expected, rel=1e-5)
    # the predictive NLL is below the samples' mean NLL (Jensen), and not the mean's
    assert expected < sum(lm_loss(lp, ids).item() for lp in per_sample) / samples
    assert abs(predictive_loss - at_mean) > 1e-4

    # predict() returns the predictive log-probabilities (the next evaluation draws)
    logits = torch.as_tensor(trainer.predict(Tokens(8, seed=1)).predictions)
    predictive, _ = by_hand()
    torch.testing.assert_close(logits, predictive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.logsumexp(-1), torch.zeros(8, LENGTH), atol=1e-5,
                               rtol=0)

    # eval_samples = 0 again: the mean, as before
    callback.eval_samples = 0
    assert trainer.evaluate()["eval_loss"] == at_mean


def test_accumulation_and_clipping_give_the_gradient_adamw_would_get(tmp_path):
    """Drop-in mode, 2 micro-batches per step, clipping active: the Trainer's gradients and
    trajectory equal a hand-written AdamW-style loop's, bit for bit (same ops, same order)."""
    steps, accumulate, max_norm = 3, 2, 0.01
    model = Classifier()
    opt = ivon(model, backend="reference", ess=500.0)
    collator, recorder = RecordingCollator(), Recorder()
    args = arguments(tmp_path, max_steps=steps, gradient_accumulation_steps=accumulate,
                     per_device_train_batch_size=3, max_grad_norm=max_norm, logging_steps=1)
    trainer = trainer_for(model, opt, args, [IVONCallback(), recorder], train=Points(24, 0),
                          evaluate=Points(6, 1), scheduler=inverse_time(opt),
                          data_collator=collator)
    trainer.train()
    norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
    assert len(norms) == steps and min(norms) > 10 * max_norm  # clipping did act

    twin = Classifier()
    twin_opt = ivon(twin, backend="reference", ess=500.0)
    scheduler = inverse_time(twin_opt)
    grads = []
    for step in range(steps):
        for batch in collator.batches[step * accumulate:(step + 1) * accumulate]:
            (twin(**batch)["loss"] / accumulate).backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), max_norm)
        grads.append([p.grad.detach().clone() for p in twin.parameters()])
        twin_opt.step()
        scheduler.step()
        twin.zero_grad()
    assert_same(recorder.grads, grads, "gradients")
    assert_same(opt.state_dict()["state"], twin_opt.state_dict()["state"])


def test_official_loop_through_ivon_trainer(tmp_path):
    """resample_on_step=False, mc_samples=2 through IVONTrainer equals the official loop written
    by hand on the Trainer's batches; an evaluation in between runs at the mean."""
    steps = 3
    model = Classifier()
    opt = ivon(model, backend="reference", resample_on_step=False, mc_samples=2)
    collator = RecordingCollator()
    evaluate = Points(6, 1)
    args = arguments(tmp_path, max_steps=steps, max_grad_norm=0.0, eval_strategy="steps",
                     eval_steps=2, per_device_eval_batch_size=6)
    trainer = trainer_for(model, opt, args, [IVONCallback()], train=Points(24, 0),
                          evaluate=evaluate, cls=IVONTrainer, scheduler=inverse_time(opt),
                          data_collator=collator)
    trainer.train()

    twin = Classifier()
    twin_opt = ivon(twin, backend="reference", resample_on_step=False, mc_samples=2)
    scheduler = inverse_time(twin_opt)
    train_batches = [b for b in collator.batches if len(b["x"]) == 4]
    for step in range(steps):
        if step == 2:  # the evaluation after step 2 saw the mean
            with torch.no_grad():
                loss = F.cross_entropy(twin(evaluate.x)["logits"], evaluate.labels).item()
            assert eval_losses(trainer)[0] == pytest.approx(loss, rel=1e-6)
        for _ in range(twin_opt.mc_samples):
            with twin_opt.sampled_params(train=True):
                twin_opt.zero_grad()
                twin(**train_batches[step])["loss"].backward()
        twin_opt.step()
        scheduler.step()
    assert_same(opt.state_dict(), twin_opt.state_dict())
    assert_same(params_of(model), params_of(twin))  # the mean, in both


@pytest.mark.parametrize("case", ["not ivon", "accumulation", "clipping", "fp16", "drop-in mc",
                                  "plain trainer"])
def test_misuse_is_a_clear_error(tmp_path, case):
    model = Classifier()
    overrides, cls = {}, Trainer
    if case == "not ivon":
        opt = torch.optim.AdamW(model.parameters())
        error, match = TypeError, "ivon_fast.IVON"
    elif case == "drop-in mc":
        opt = ivon(model, mc_samples=2)
        error, match = ValueError, "mc_samples"
    else:
        opt = ivon(model, resample_on_step=False, mc_samples=2 if case != "plain trainer" else 1)
        cls = IVONTrainer
        if case == "accumulation":
            overrides = dict(gradient_accumulation_steps=2)
            error, match = ValueError, "gradient_accumulation_steps"
        elif case == "clipping":
            overrides = dict(max_grad_norm=1.0)
            error, match = ValueError, "max_grad_norm"
        elif case == "fp16":
            overrides = dict(max_grad_norm=0.0)
            error, match = ValueError, "fp16"
        else:
            cls = Trainer
            error, match = RuntimeError, "IVONTrainer"
    trainer = trainer_for(model, opt, arguments(tmp_path, **overrides), [IVONCallback()],
                          train=Points(8, 0), evaluate=Points(4, 1), cls=cls)
    if case == "fp16":  # no fp16 on a CPU: set after the Trainer built its accelerator (the
        trainer.args.fp16 = True  # callback's check reads only the flag)
    with pytest.raises(error, match=match):
        trainer.train()


def test_predictive_evaluation_refuses_a_loss_that_is_not_cross_entropy(tmp_path):
    model = Classifier(loss="mse")
    trainer = trainer_for(model, ivon(model), arguments(tmp_path, max_steps=1),
                          [IVONCallback(eval_samples=2)], train=Points(8, 0),
                          evaluate=Points(4, 1))
    trainer.train()
    with pytest.raises(ValueError, match="not a softmax cross-entropy"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="eval_samples"):
        IVONCallback(eval_samples=-1)


def test_evaluation_outside_a_phase_warns(tmp_path):
    model = gpt()
    trainer = trainer_for(model, ivon(model), arguments(tmp_path), [IVONCallback()])
    with pytest.warns(RuntimeWarning, match="posterior sample, not the mean"):
        trainer.evaluate()


def test_example_runs(tmp_path):
    spec = importlib.util.spec_from_file_location(
        "gpt_hf_trainer", os.path.join(ROOT, "examples", "gpt_hf_trainer.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = example.main(["--max-steps", "4", "--eval-steps", "2", "--batch-size", "4",
                               "--block", "16", "--eval-samples", "2", "--cpu",
                               "--output-dir", str(tmp_path)])
    for key in ("train_loss", "eval_loss_mean", "eval_loss_predictive"):
        assert math.isfinite(result[key]), key


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_zero_element_and_zero_dim_params_leave_training_as_without_them(tmp_path, mode):
    """A device marker (zero elements) and an unused zero-dim param, through evaluations and
    checkpoints: the GPT trains and evaluates as without them."""
    def run(markers, directory):
        model = gpt()
        if markers:
            model.marker = torch.nn.Parameter(torch.empty(0))   # first in parameters()
            model.extra = torch.nn.Module()                      # a child after the others
            model.extra.unused = torch.nn.Parameter(torch.tensor(0.5))
        opt = ivon(model, resample_on_step=mode == "dropin")
        args = arguments(directory, max_steps=2, eval_strategy="steps", eval_steps=1,
                         save_strategy="steps", save_steps=2)
        trainer = trainer_for(model, opt, args, [IVONCallback()],
                              cls=IVONTrainer if mode == "official" else Trainer)
        trainer.train()
        names = [name for name, _ in gpt().named_parameters()]
        return [dict(model.named_parameters())[name].detach() for name in names], \
            eval_losses(trainer)

    (params, losses), (plain_params, plain_losses) = run(True, tmp_path / "a"), \
        run(False, tmp_path / "b")
    assert losses == plain_losses and len(losses) == 2
    assert_same(params, plain_params, "params")


def test_a_trainer_built_ivon_with_a_flat_prior_warns_and_says_how_to_keep_it(tmp_path):
    """With optimizer_cls_and_kwargs the Trainer sets every group's weight_decay (IVON's prior
    precision) from TrainingArguments: 0.0 by default. The callback says so at train start."""
    model = Classifier()
    args = arguments(tmp_path, max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Points(8, 0),
                      optimizer_cls_and_kwargs=(IVON, dict(lr=0.05, ess=100.0,
                                                           resample_on_step=True)),
                      callbacks=[IVONCallback()])
    with pytest.warns(UserWarning, match="weight_decay=0.0: a flat prior") as caught:
        trainer.train()
    assert "optimizers=(IVON(model.parameters()" in str(caught[0].message)
    assert {group["weight_decay"] for group in trainer.optimizer.param_groups} == {0.0}
    # built by hand, IVON keeps its prior: no warning
    model = Classifier()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer_for(model, ivon(model), arguments(tmp_path, max_steps=1), [IVONCallback()],
                    train=Points(8, 0)).train()


def test_checkpoints_on_steps_without_evaluation_hold_the_mean(tmp_path):
    """save_strategy='steps' with no evaluation: each checkpoint's model file is the posterior
    mean at that step (a run stopped there gives it), and training is the run without saves."""
    def run(steps, directory, **saves):
        model = gpt()
        opt = ivon(model)
        trainer_for(model, opt, arguments(directory, max_steps=steps, **saves),
                    [IVONCallback(mean_after_train=False)]).train()
        return model, opt

    model, opt = run(2, tmp_path / "saved", save_strategy="steps", save_steps=1)
    names = [name for name, _ in model.named_parameters()]
    for step in (1, 2):
        _, stopped = run(step, tmp_path / f"stopped{step}")
        saved = safetensors_torch.load_file(
            str(tmp_path / "saved" / f"checkpoint-{step}" / "model.safetensors"))
        assert_same([saved[name] for name in names], stopped.posterior().mean, f"step {step}")
    plain, plain_opt = run(2, tmp_path / "plain")
    assert_same(params_of(model), params_of(plain))   # the training sample, in both
    assert_same(opt.state_dict(), plain_opt.state_dict())
