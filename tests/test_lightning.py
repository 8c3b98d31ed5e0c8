"""IVON under the real PyTorch Lightning Trainer (CPU, tiny models).

Every training test checks Lightning's run against an independent expectation: the same data,
initial weights and IVON seed trained by a plain hand-written loop (``backend='reference'``);
params, ``opt.state_dict()`` and ``opt.posterior()`` must be equal bit for bit. Lightning adds no
arithmetic of its own to the loss (it divides it by ``accumulate_grad_batches``, 1 here, exact),
so no tolerance is needed.
"""
import importlib.util
import os
import pathlib
import random
import warnings

import numpy
import pytest
import torch

pytest.importorskip("lightning")

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.plugins.precision import MixedPrecision  # noqa: E402

import ivon_fast  # noqa: E402
from ivon_fast.integrations.lightning import IVONCallback  # noqa: E402

# Lightning's advice for real runs (more dataloader workers, a logger, ...) is noise here
pytestmark = pytest.mark.filterwarnings(
    "ignore:.*does not have many workers:UserWarning",
    "ignore:.*(LitLogger|litlogger|GPU available|TPU available).*",
    "ignore::lightning.fabric.utilities.warnings.PossibleUserWarning",
    r"ignore:.*isinstance\(treespec, LeafSpec\)",
    "ignore:The dirpath has changed",   # the resumed run saves into a folder of its own
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """The models are tiny: more intra-op threads only add contention (on a busy 2-core machine
    a convolution ran 40x slower with 2 threads than with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

BATCH, BATCHES = 8, 4                     # 4 optimizer steps per epoch
GENERATOR = torch.Generator().manual_seed(3)
X = torch.randn(BATCH * BATCHES, 6, generator=GENERATOR)
Y = torch.randint(0, 3, (BATCH * BATCHES,), generator=GENERATOR)


def loader():
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)


def batches():
    return [(X[i:i + BATCH], Y[i:i + BATCH]) for i in range(0, len(X), BATCH)]


def make_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def make_ivon(params, mode, mc):
    return ivon_fast.IVON(params, lr=0.05, ess=len(X), hess_init=0.5, mc_samples=mc, seed=7,
                          backend="reference", resample_on_step=(mode == "dropin"))


def loss_of(net, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(net(x), y)


class Classifier(pl.LightningModule):
    """A tiny classifier trained with IVON in either loop, automatically or by hand.

    Args:
        mode (str): 'official' or 'dropin' (``resample_on_step=True``).
        mc (int, default 1): IVON's mc_samples.
        manual (bool, default False): manual optimization through ``self.optimizers()``.
    """

    def __init__(self, mode, mc=1, manual=False):
        super().__init__()
        self.net = make_net()
        self.mode, self.mc = mode, mc
        self.automatic_optimization = not manual
        self.mean_losses = []   # manual: the loss at the posterior mean after every step
        self.seen_mean = []     # evaluation: whether the params held the posterior mean
        self.evaluated = []     # evaluation: the params it ran at
        self.training_steps = 0

    def configure_optimizers(self):
        return make_ivon(self.parameters(), self.mode, self.mc)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        if self.automatic_optimization:
            return loss_of(self.net, batch)
        opt = self.optimizers()   # Lightning's LightningOptimizer around the IVON
        if self.mode == "official":
            for _ in range(opt.mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    self.manual_backward(loss_of(self.net, batch))
            opt.step()
        else:
            self.manual_backward(loss_of(self.net, batch))
            opt.step()
            opt.zero_grad()
        with opt.mean_params(), torch.no_grad():
            self.mean_losses.append(loss_of(self.net, batch))

    def _record(self):
        ivon = self.trainer.optimizers[0] if self.trainer.optimizers else None
        if isinstance(ivon, ivon_fast.IVON):
            mean = ivon.posterior().mean
            self.seen_mean.append(all(torch.equal(p, m) for p, m in zip(self.parameters(), mean)))
        self.evaluated.append([p.detach().clone() for p in self.parameters()])

    def validation_step(self, batch, batch_idx):
        self._record()
        return loss_of(self.net, batch)

    def test_step(self, batch, batch_idx):
        self._record()

    def predict_step(self, batch, batch_idx):
        self._record()
        return self.net(batch[0])


def make_trainer(tmp_path, **options):
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False,
                    default_root_dir=tmp_path, num_sanity_val_steps=0, max_epochs=2)
    settings.update(options)
    return pl.Trainer(**settings)


def fit(tmp_path, module, val=False, ckpt_path=None, **options):
    trainer = make_trainer(tmp_path, **options)
    trainer.fit(module, loader(), loader() if val else None, ckpt_path=ckpt_path)
    return trainer, ivon_fast.unwrap(trainer.optimizers[0])


def plain_run(mode, mc=1, epochs=2, record_mean=False):
    """The hand-written loop: IVON's official or drop-in loop over the same batches."""
    net = make_net()
    opt = make_ivon(net.parameters(), mode, mc)
    mean_losses = []
    for _ in range(epochs):
        for batch in batches():
            if mode == "official":
                for _ in range(mc):
                    with opt.sampled_params(train=True):
                        opt.zero_grad()
                        loss_of(net, batch).backward()
                opt.step()
            elif mc == 1:
                loss_of(net, batch).backward()
                opt.step()
                opt.zero_grad()
            else:  # the drop-in mode takes more than one sample per step only with a closure
                def closure():
                    opt.zero_grad()
                    loss = loss_of(net, batch)
                    loss.backward()
                    return loss
                opt.step(closure)
            if record_mean:
                with opt.mean_params(), torch.no_grad():
                    mean_losses.append(loss_of(net, batch))
    return net, opt, mean_losses


def assert_equal_tree(a, b, where="state_dict"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_tree(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for index, (x, y) in enumerate(zip(a, b)):
            assert_equal_tree(x, y, f"{where}[{index}]")
    else:
        assert a == b, where


def assert_same_run(net_a, opt_a, net_b, opt_b):
    assert opt_a.current_step == opt_b.current_step > 0
    for p, q in zip(net_a.parameters(), net_b.parameters(), strict=True):
        assert torch.equal(p, q)
    assert_equal_tree(opt_a.state_dict(), opt_b.state_dict())
    post_a, post_b = opt_a.posterior(), opt_b.posterior()
    assert_equal_tree((post_a.mean, post_a.std), (post_b.mean, post_b.std), "posterior")


def holds_mean(module, ivon):
    return all(torch.equal(p, m) for p, m in zip(module.parameters(), ivon.posterior().mean))


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("mode, mc", [("official", 1), ("official", 2), ("dropin", 1),
                                      ("dropin", 2)])
def test_automatic_optimization_trains_like_the_plain_loop(tmp_path, mode, mc):
    """Lightning passes its closure (training_step, zero_grad, backward) to IVON.step(closure),
    which draws one sample per call."""
    module = Classifier(mode, mc)
    _, ivon = fit(tmp_path, module)
    net, opt, _ = plain_run(mode, mc)
    assert ivon.current_step == 2 * BATCHES
    assert_same_run(module.net, ivon, net, opt)


@pytest.mark.parametrize("mode, mc", [("official", 1), ("official", 2), ("dropin", 1)])
def test_manual_optimization_through_lightning_optimizer_trains_like_the_plain_loop(
        tmp_path, mode, mc):
    """sampled_params(train=True), mean_params(), zero_grad() and step() called on
    self.optimizers() (a LightningOptimizer) act on the IVON that Lightning steps."""
    module = Classifier(mode, mc, manual=True)
    _, ivon = fit(tmp_path, module)
    net, opt, mean_losses = plain_run(mode, mc, record_mean=True)
    assert_same_run(module.net, ivon, net, opt)
    assert len(module.mean_losses) == len(mean_losses) == 2 * BATCHES
    for a, b in zip(module.mean_losses, mean_losses):
        assert torch.equal(a, b)


def test_bf16_mixed_official_loop_trains_like_the_plain_loop_under_autocast(tmp_path):
    """'bf16-mixed' passes the closure to step(closure): the official loop works."""
    module = Classifier("official", 2)
    _, ivon = fit(tmp_path, module, precision="bf16-mixed")
    net = make_net()
    opt = make_ivon(net.parameters(), "official", 2)
    for _ in range(2):
        for batch in batches():
            for _ in range(2):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                        loss = loss_of(net, batch)
                    loss.backward()
            opt.step()
    assert_same_run(module.net, ivon, net, opt)


@pytest.mark.parametrize("precision, dtype", [("bf16-true", torch.bfloat16),
                                              ("64-true", torch.float64)])
def test_true_precisions_train_the_converted_params(tmp_path, precision, dtype):
    """Lightning converts the module before configure_optimizers: IVON gets bf16 params (fp32
    master state) or float64 params (the reference backend)."""
    module = Classifier("official", 2)
    _, ivon = fit(tmp_path, module, precision=precision, callbacks=[IVONCallback()])
    assert ivon.current_step == 2 * BATCHES
    assert all(p.dtype == dtype for p in module.parameters())
    assert ivon.posterior().mean[0].dtype == (torch.float64 if dtype == torch.float64
                                              else torch.float32)


def test_accumulated_batches_in_the_drop_in_mode_train_like_the_plain_loop(tmp_path):
    module = Classifier("dropin")
    _, ivon = fit(tmp_path, module, accumulate_grad_batches=2, callbacks=[IVONCallback()])
    net = make_net()
    opt = make_ivon(net.parameters(), "dropin", 1)
    for _ in range(2):
        for index, batch in enumerate(batches()):
            (loss_of(net, batch) / 2).backward()
            if index % 2 == 1:
                opt.step()
                opt.zero_grad()
    assert ivon.current_step == BATCHES
    assert_same_run(module.net, ivon, net, opt)


# ----------------------------------------------------------------------------- the callback


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_validation_runs_at_the_mean_and_leaves_training_unchanged(tmp_path, mode):
    """Validation twice per epoch sees the posterior mean; training continues bit for bit as in
    a run without validation. In the official loop the params hold the mean between steps
    (the callback does nothing there); in the drop-in mode it puts the mean in."""
    validated = Classifier(mode)
    _, ivon = fit(tmp_path, validated, val=True, val_check_interval=2, num_sanity_val_steps=1,
                  callbacks=[IVONCallback()])
    assert len(validated.seen_mean) == 1 + 2 * 2 * BATCHES  # sanity check, then 2 per epoch
    assert all(validated.seen_mean)
    plain = Classifier(mode)
    _, plain_ivon = fit(tmp_path, plain)
    assert_same_run(validated.net, ivon, plain.net, plain_ivon)
    # drop-in: the params hold a sample again, not the mean
    assert holds_mean(validated, ivon) == (mode == "official")


def test_without_the_callback_drop_in_validation_runs_at_the_sample(tmp_path):
    module = Classifier("dropin")
    _, ivon = fit(tmp_path, module, val=True, limit_val_batches=1)
    assert module.seen_mean == [False, False]


def test_test_and_predict_run_at_the_mean_then_the_sample_comes_back(tmp_path):
    module = Classifier("dropin")
    callback = IVONCallback()
    trainer, ivon = fit(tmp_path, module, callbacks=[callback], max_epochs=1)
    sample = [p.detach().clone() for p in module.parameters()]
    mean = ivon.posterior().mean
    trainer.test(module, loader(), verbose=False)
    trainer.predict(module, loader())
    # a Trainer that did not fit the model: the callback uses the IVON of its last fit
    make_trainer(tmp_path, callbacks=[callback]).test(module, loader(), verbose=False)
    assert len(module.evaluated) == 3 * BATCHES
    for seen in module.evaluated:
        assert_equal_tree(seen, mean, "evaluated params")
    for p, s in zip(module.parameters(), sample):
        assert torch.equal(p, s)
    assert not holds_mean(module, ivon)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_checkpoints_hold_the_mean(tmp_path, mode):
    module = Classifier(mode)
    trainer, ivon = fit(tmp_path, module, callbacks=[IVONCallback()], max_epochs=1)
    before = [p.detach().clone() for p in module.parameters()]
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    names = [name for name, _ in module.named_parameters()]
    assert_equal_tree([saved[name] for name in names], ivon.posterior().mean, "checkpoint")
    for p, b in zip(module.parameters(), before):
        assert torch.equal(p, b)


@pytest.mark.parametrize("mode, mc", [("official", 2), ("dropin", 1)])
def test_resuming_from_a_lightning_checkpoint_continues_exactly(tmp_path, mode, mc):
    """3 epochs straight (saving a checkpoint each epoch, at validation end) against the
    checkpoint after epoch 1 resumed by a new Trainer and model to epoch 3."""
    def callbacks(folder):
        return [IVONCallback(), ModelCheckpoint(dirpath=tmp_path / folder, filename="{epoch}",
                                                save_top_k=-1, every_n_epochs=1)]

    straight = Classifier(mode, mc)
    _, straight_ivon = fit(tmp_path, straight, val=True, limit_val_batches=1, max_epochs=3,
                           enable_checkpointing=True, callbacks=callbacks("straight"))
    resumed = Classifier(mode, mc)
    trainer, resumed_ivon = fit(tmp_path, resumed, val=True, limit_val_batches=1, max_epochs=3,
                                enable_checkpointing=True, callbacks=callbacks("resumed"),
                                ckpt_path=tmp_path / "straight" / "epoch=0.ckpt")
    assert trainer.global_step == 3 * BATCHES
    assert_same_run(straight.net, straight_ivon, resumed.net, resumed_ivon)
    # the checkpoint's weights are the mean its optimizer state holds (the drop-in mode's params
    # held a sample when it was saved, at validation end)
    checkpoint = torch.load(tmp_path / "straight" / "epoch=0.ckpt", weights_only=False)
    state = checkpoint["optimizer_states"][0]["state"]
    means = [state[index]["mean"] for index in sorted(state)]
    for (name, param), mean in zip(straight.named_parameters(), means, strict=True):
        assert torch.equal(checkpoint["state_dict"][name], mean.view_as(param))


def test_an_exception_during_validation_gives_the_sample_back(tmp_path):
    class FailingValidation(Classifier):
        def validation_step(self, batch, batch_idx):
            raise KeyError("validation failed")

    module = FailingValidation("dropin")
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[IVONCallback()])
    with pytest.raises(KeyError, match="validation failed"):
        trainer.fit(module, loader(), loader())
    ivon = trainer.optimizers[0]
    assert ivon.current_step == BATCHES and not holds_mean(module, ivon)
    ivon.state_dict()  # no mean_params() block left open


# ----------------------------------------------------------------------------- precision


def fp16_plugin():
    """'16-mixed' on CPU: Lightning turns Trainer(precision='16-mixed') on CPU into 'bf16-mixed'
    (with a warning), so pass the fp16 plugin with its GradScaler explicitly."""
    return MixedPrecision("16-mixed", "cpu")


def test_16_mixed_with_the_official_loop_is_refused_at_fit_start(tmp_path):
    module = Classifier("official")
    with pytest.raises(RuntimeError, match=r"resample_on_step=True.*bf16-mixed"):
        fit(tmp_path, module, plugins=[fp16_plugin()], callbacks=[IVONCallback()])
    assert module.training_steps == 0  # refused before any training step ran


def test_16_mixed_with_the_official_loop_fails_loudly_without_the_callback(tmp_path):
    """Without the callback the plugin computes the gradient at the mean, then IVON.step()
    refuses to step without a posterior sample: never a silent wrong update."""
    with pytest.raises(RuntimeError, match="without a gradient from a posterior sample"):
        fit(tmp_path, Classifier("official"), plugins=[fp16_plugin()])


def test_16_mixed_drop_in_with_several_samples_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match="mc_samples=1"):
        fit(tmp_path, Classifier("dropin", 2), plugins=[fp16_plugin()],
            callbacks=[IVONCallback()])


def test_accumulation_with_the_official_loop_is_refused(tmp_path):
    with pytest.raises(RuntimeError, match=r"accumulate_grad_batches=2.*resample_on_step=True"):
        fit(tmp_path, Classifier("official"), accumulate_grad_batches=2,
            callbacks=[IVONCallback()])


@pytest.mark.parametrize("mode, manual", [("dropin", False), ("official", True)])
def test_16_mixed_trains_like_the_plain_loop_with_a_grad_scaler(tmp_path, mode, manual):
    """The drop-in mode in automatic optimization, and the official loop by hand (the user's
    code takes the samples), train under '16-mixed' like a plain fp16 autocast + GradScaler loop
    (GradScaler hands IVON its scale: the kernels unscale)."""
    module = Classifier(mode, manual=manual)
    trainer, ivon = fit(tmp_path, module, plugins=[fp16_plugin()], callbacks=[IVONCallback()])
    net = make_net()
    opt = make_ivon(net.parameters(), mode, 1)
    scaler = torch.amp.GradScaler("cpu")
    autocast = lambda: torch.autocast("cpu", dtype=torch.float16, cache_enabled=False)  # noqa
    for _ in range(2):
        for batch in batches():
            if mode == "official":
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    with autocast():
                        loss = loss_of(net, batch)
                    scaler.scale(loss).backward()
            else:
                opt.zero_grad()
                with autocast():
                    loss = loss_of(net, batch)
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
    assert_same_run(module.net, ivon, net, opt)
    assert trainer.precision_plugin.scaler.get_scale() == scaler.get_scale()


# ----------------------------------------------------------------------------- misc


def test_callback_arguments_are_checked_and_other_optimizers_are_left_alone(tmp_path):
    with pytest.raises(ValueError, match="evaluate_at_mean"):
        IVONCallback(evaluate_at_mean="yes")

    class WithSGD(Classifier):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[IVONCallback()])
        trainer.fit(WithSGD("official"), loader(), loader())
    assert any("found no ivon_fast.IVON" in str(w.message) for w in caught)


def test_example_image_classifier_runs(capsys):
    pytest.importorskip("sklearn")
    path = ROOT / "examples" / "image_classifier_lightning.py"
    spec = importlib.util.spec_from_file_location("image_classifier_lightning", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    # the example seeds everything (pl.seed_everything): keep that out of the other tests
    saved_env = {name: os.environ.get(name) for name in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS")}
    saved_random, saved_numpy = random.getstate(), numpy.random.get_state()
    try:
        with torch.random.fork_rng():
            results = example.main(["--epochs", "1", "--samples", "2", "--width", "4"])
    finally:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        random.setstate(saved_random)
        numpy.random.set_state(saved_numpy)
    assert set(results) == {"mean", "samples=2"}
    for scores in results.values():
        assert set(scores) == {"accuracy", "nll", "ece", "brier"}
        assert 0.0 <= scores["accuracy"] <= 1.0
    assert "accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_zero_element_and_zero_dim_params_leave_training_as_without_them(tmp_path, mode):
    """A device marker (zero elements) and an unused zero-dim param: with validation through
    the callback and its checkpoints, the net trains as in the plain loop."""
    module = Classifier(mode)
    module.marker = torch.nn.Parameter(torch.empty(0))   # first in parameters(): no elements
    module.extra = torch.nn.Module()   # a child after the net: its element follows the net's
    module.extra.unused_scale = torch.nn.Parameter(torch.tensor(0.5))
    _, ivon = fit(tmp_path, module, val=True, val_check_interval=2, callbacks=[IVONCallback()])
    net, _, _ = plain_run(mode, 1)
    for a, b in zip(module.net.parameters(), net.parameters()):
        assert torch.equal(a, b)
    assert ivon.current_step == 2 * BATCHES


def test_an_exception_after_a_write_in_the_mean_phase_discards_the_write(tmp_path):
    """Validation writes to a param (at the mean), then fails: as for an exception inside
    mean_params(), the write is discarded and the params hold the training sample again; the
    posterior is the one training left."""
    class WriteThenFail(Classifier):
        def validation_step(self, batch, batch_idx):
            with torch.no_grad():
                self.net[0].weight.fill_(7.0)
            raise KeyError("validation failed")

    module = WriteThenFail("dropin")
    trainer = make_trainer(tmp_path, max_epochs=1, callbacks=[IVONCallback()])
    with pytest.raises(KeyError, match="validation failed"):
        trainer.fit(module, loader(), loader())
    ivon = trainer.optimizers[0]
    plain = Classifier("dropin")
    _, plain_ivon = fit(tmp_path, plain, max_epochs=1)
    assert_same_run(module.net, ivon, plain.net, plain_ivon)
    assert not bool((module.net[0].weight == 7.0).any())
