"""Behaviour tests of ``ivon_fast.IVON`` (CPU, backend='reference').

Every expectation here is independent of the code under test: either an uninterrupted / unperturbed
run of the same optimizer, ivon-opt itself, or an explicit computation with the ``reference`` ops
(the spec of docs/DESIGN.md section 5) driven by hand (draw numbers, global offsets, scalars).
"""
from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

import ivon
from ivon_fast import IVON, reference
from ivon_fast.scalars import StepScalars

HP = dict(lr=0.05, ess=100.0, hess_init=1.0, beta1=0.9, beta2=0.99, weight_decay=1e-3)
SEED = 1234


# ----------------------------------------------------------------------------- fixtures / helpers

class Net(nn.Module):
    """Linear-Tanh-Linear plus a scalar param and an odd-shaped one; optionally a frozen param in
    the middle of the param order and a Linear that the forward never uses."""

    def __init__(self, frozen=False, unused=False, extra=False):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        if frozen:
            self.frozen = nn.Parameter(torch.randn(2), requires_grad=False)
        self.scale = nn.Parameter(torch.tensor(0.7))
        if unused:
            self.unused = nn.Linear(3, 3)
        self.odd = nn.Parameter(torch.randn(3, 1, 5) * 0.3)
        if extra:
            self.head = nn.Linear(2, 2)

    def forward(self, x):
        y = self.body(x) * self.scale
        z = torch.tanh(x[:, :3] @ self.odd.reshape(3, 5))
        y = y + z[:, :2] + z[:, 2:].sum(-1, keepdim=True)
        if hasattr(self, "frozen"):
            y = y + self.frozen
        if hasattr(self, "head"):
            y = y + self.head(y)
        return y


def make_model(seed=0, dtype=torch.float32, **kwargs):
    torch.manual_seed(seed)
    return Net(**kwargs).to(dtype)


_GEN = torch.Generator().manual_seed(42)
XS = torch.randn(5, 16, 4, generator=_GEN)
YS = torch.randn(5, 16, 2, generator=_GEN)


def batch(i, dtype=torch.float32):
    return XS[i % len(XS)].to(dtype), YS[i % len(YS)].to(dtype)


def loss_fn(model, i, dtype=torch.float32):
    x, y = batch(i, dtype)
    return ((model(x) - y) ** 2).mean()


def official_iter(model, opt, i, mc=1):
    for _ in range(mc):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model, i).backward()
    opt.step()


def dropin_iter(model, opt, i):
    loss_fn(model, i).backward()
    opt.step()
    opt.zero_grad()


def train(model, opt, mode, start, n, mc=1, hook=None):
    for i in range(start, start + n):
        if mode == "official":
            official_iter(model, opt, i, mc)
        else:
            dropin_iter(model, opt, i)
        if hook is not None:
            hook(i)


def build(mode, model_seed=0, opt_seed=1, mc=1, rng="philox", **model_kwargs):
    model = make_model(model_seed, **model_kwargs)
    torch.manual_seed(opt_seed)   # the optimizer's seed comes from torch's generator
    opt = IVON(model.parameters(), **HP, mc_samples=mc, backend="reference", rng=rng,
               resample_on_step=(mode == "dropin"))
    return model, opt


def assert_same_run(model_a, opt_a, model_b, opt_b):
    params_a, params_b = list(model_a.parameters()), list(model_b.parameters())
    assert len(params_a) == len(params_b)
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        if pa.requires_grad:
            for key in ("mean", "momentum", "hess"):
                assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key]), key


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(model, snap):
    for p, s in zip(model.parameters(), snap):
        assert torch.equal(p, s)


def assert_state_dicts_equal(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (a.keys() if isinstance(a, dict) else a)
        for key in a:
            assert_state_dicts_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_dicts_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def roundtrip(obj, **load_kwargs):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False, **load_kwargs)


def load_checkpoint(model, opt, checkpoint, model_first):
    """Load {'model': ..., 'opt': ...} in the order users do either way."""
    if model_first:
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["opt"])
    else:
        opt.load_state_dict(checkpoint["opt"])
        model.load_state_dict(checkpoint["model"])


def moved(model, snap):
    return any(not torch.equal(p, s) for p, s in zip(model.parameters(), snap))


def normalized_noise(sample, mean, hess, ess, weight_decay):
    return ((sample.double() - mean.double()) * (ess * (hess.double() + weight_decay)).sqrt())


# ----------------------------------------------------------------------------- explicit simulator

class Simulator:
    """IVON driven by hand with the reference ops: per param group one flat mean / momentum / hess,
    global offsets in param_groups order, training draws 0, 1, 2, ..."""

    def __init__(self, model, groups, mode, seed, mc=1):
        # groups: list of (list of param names, hyperparameter dict)
        self.model, self.mode, self.seed, self.mc = model, mode, seed, mc
        named = dict(model.named_parameters())
        self.groups, offset = [], 0
        for names, hp in groups:
            init = torch.cat([named[n].detach().reshape(-1).float() for n in names])
            self.groups.append(dict(
                names=names, shapes=[named[n].shape for n in names], hp=dict(hp), offset=offset,
                mean=init.clone(), momentum=torch.zeros_like(init),
                hess=torch.full_like(init, hp["hess_init"]), param=init.clone(),
                avg_grad=torch.zeros_like(init), avg_hess=torch.zeros_like(init)))
            offset += init.numel()
        self.draw, self.t = 0, 0
        if mode == "dropin":
            self._sample(self.draw)

    def _sample(self, draw):
        for g in self.groups:
            reference.sample(g["param"], g["mean"], g["hess"], seed=self.seed, draw=draw,
                             offset=g["offset"], ess=g["hp"]["ess"],
                             weight_decay=g["hp"]["weight_decay"])

    def set_mean(self, weights):
        for g in self.groups:
            g["mean"].copy_(torch.cat([weights[n].reshape(-1).float() for n in g["names"]]))
            g["param"].copy_(g["mean"])

    def params(self):
        out = {}
        for g in self.groups:
            for name, piece in zip(g["names"], torch.split(g["param"], [
                    math.prod(s) for s in g["shapes"]])):
                out[name] = piece.view(g["shapes"][g["names"].index(name)])
        return out

    def _grads(self, i):
        leaves = {n: p.detach().clone().requires_grad_() for n, p in self.params().items()}
        x, y = batch(i)
        loss = ((functional_call(self.model, leaves, (x,)) - y) ** 2).mean()
        loss.backward()
        return [torch.cat([leaves[n].grad.reshape(-1) for n in g["names"]]) for g in self.groups]

    def step(self, i):
        self.t += 1
        if self.mode == "official":
            for k in range(self.mc):
                self._sample(self.draw)
                grads = self._grads(i)
                if k < self.mc - 1:
                    for g, grad in zip(self.groups, grads):
                        reference.accumulate(
                            grad, g["hess"], g["avg_grad"], g["avg_hess"], seed=self.seed,
                            draw=self.draw, offset=g["offset"], count=k + 1, ess=g["hp"]["ess"],
                            weight_decay=g["hp"]["weight_decay"], hess_approx="price")
                    self.draw += 1
            next_draw = None
        else:   # the params hold the sample of self.draw; more samples only via step(closure)
            for k in range(self.mc):
                if k > 0:
                    for g, grad in zip(self.groups, grads):
                        reference.accumulate(
                            grad, g["hess"], g["avg_grad"], g["avg_hess"], seed=self.seed,
                            draw=self.draw, offset=g["offset"], count=k, ess=g["hp"]["ess"],
                            weight_decay=g["hp"]["weight_decay"], hess_approx="price")
                    self.draw += 1
                    self._sample(self.draw)
                grads = self._grads(i)
            next_draw = self.draw + 1
        for g, grad in zip(self.groups, grads):
            hp = g["hp"]
            reference.update(
                g["param"], grad, g["mean"], g["momentum"], g["hess"], g["avg_grad"],
                g["avg_hess"], seed=self.seed, draw=self.draw, next_draw=next_draw,
                offset=g["offset"], count=self.mc, hess_approx="price",
                scalars=StepScalars.of(
                    lr=hp["lr"] * (hp["hess_init"] + hp["weight_decay"]), ess=hp["ess"],
                    weight_decay=hp["weight_decay"], beta1=hp["beta1"], beta2=hp["beta2"],
                    debias=1.0 - hp["beta1"] ** self.t))
        self.draw += 1
        if self.mode == "official":
            for g in self.groups:
                g["param"].copy_(g["mean"])

    def assert_matches(self, model, opt):
        named = dict(model.named_parameters())
        for g in self.groups:
            for key, flat in (("param", g["param"]), ("mean", g["mean"]),
                              ("momentum", g["momentum"]), ("hess", g["hess"])):
                if key == "param":
                    got = torch.cat([named[n].detach().reshape(-1) for n in g["names"]])
                else:
                    got = torch.cat([opt.state[named[n]][key].reshape(-1) for n in g["names"]])
                assert torch.equal(got, flat), key


def two_group_spec(model):
    names = [n for n, _ in model.named_parameters()]
    g0 = [n for n in names if n.startswith("body.")]
    g1 = [n for n in names if not n.startswith("body.")]
    hp1 = dict(HP, lr=0.02, weight_decay=0.05)
    return [(g0, dict(HP)), (g1, hp1)]


def opt_groups(model, spec, **extra):
    named = dict(model.named_parameters())
    return [dict(params=[named[n] for n in names], **hp) for names, hp in spec]


# ----------------------------------------------------------------------------- 1. resume

@pytest.mark.parametrize("mode,mc", [("official", 1), ("official", 3), ("dropin", 1)])
def test_resume_bitwise(mode, mc):
    n, m = 4, 3
    model_a, opt_a = build(mode, mc=mc)
    initial = snapshot(model_a)
    train(model_a, opt_a, mode, 0, n + m, mc)
    assert moved(model_a, initial)

    model_b, opt_b = build(mode, mc=mc)
    train(model_b, opt_b, mode, 0, n, mc)
    saved = roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    del model_b, opt_b

    model_c, opt_c = build(mode, model_seed=77, opt_seed=99, mc=mc)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    train(model_c, opt_c, mode, n, m, mc)
    assert_same_run(model_a, opt_a, model_c, opt_c)


def test_resume_mid_accumulation():
    mc = 3
    model_a, opt_a = build("official", mc=mc)
    train(model_a, opt_a, "official", 0, 5, mc)

    model_b, opt_b = build("official", mc=mc)
    train(model_b, opt_b, "official", 0, 2, mc)
    for _ in range(2):   # two of the three samples of step 3
        with opt_b.sampled_params(train=True):
            opt_b.zero_grad()
            loss_fn(model_b, 2).backward()
    saved = roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()},
                      map_location="cpu")

    model_c, opt_c = build("official", model_seed=5, opt_seed=6, mc=mc)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    with opt_c.sampled_params(train=True):
        opt_c.zero_grad()
        loss_fn(model_c, 2).backward()
    opt_c.step()
    train(model_c, opt_c, "official", 3, 2, mc)
    assert_same_run(model_a, opt_a, model_c, opt_c)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_resume_map_location_and_no_aliasing(mode):
    model_a, opt_a = build(mode)
    train(model_a, opt_a, mode, 0, 5)

    model_b, opt_b = build(mode)
    train(model_b, opt_b, mode, 0, 2)
    saved = roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()},
                      map_location="cpu")
    model_c, opt_c = build(mode, model_seed=3, opt_seed=4)
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    # the optimizer must copy, not alias, the loaded tensors
    for entry in saved["opt"]["state"].values():
        for value in entry.values():
            if isinstance(value, torch.Tensor):
                value.fill_(12345.0)
    train(model_c, opt_c, mode, 2, 3)
    assert_same_run(model_a, opt_a, model_c, opt_c)


def test_state_dict_is_a_snapshot_not_live_views():
    model, opt = build("official")
    initial = [p.detach().reshape(-1).clone() for p in model.parameters()]
    sd = opt.state_dict()
    train(model, opt, "official", 0, 2)
    for index, (p, init) in enumerate(zip(model.parameters(), initial)):
        assert torch.equal(sd["state"][index]["mean"], init)
        assert torch.equal(sd["state"][index]["hess"], torch.full_like(init, HP["hess_init"]))
    assert moved(model, [i.view(p.shape) for i, p in zip(initial, model.parameters())])


# ----------------------------------------------------------------------------- 2. ivon-opt state

def _ivon_opt_groups(model):
    return [dict(params=list(model.body.parameters())),
            dict(params=[model.scale, model.odd], lr=0.02, weight_decay=0.05)]


def test_load_ivon_opt_state_dict():
    k, m = 3, 3
    model_ref = make_model(0)
    opt_ref = ivon.IVON(_ivon_opt_groups(model_ref), **HP)
    torch.manual_seed(10)
    train(model_ref, opt_ref, "official", 0, k)

    model = make_model(50)
    model.load_state_dict(model_ref.state_dict())
    opt = IVON(_ivon_opt_groups(model), lr=0.3, ess=7.0, backend="reference", rng="torch")
    opt.load_state_dict(roundtrip(opt_ref.state_dict()), step=k)
    assert opt.param_groups[1]["lr"] == 0.02 and opt.param_groups[0]["ess"] == HP["ess"]

    torch.manual_seed(20)
    train(model_ref, opt_ref, "official", k, m)
    torch.manual_seed(20)
    train(model, opt, "official", k, m)
    for p_ref, p in zip(model_ref.parameters(), model.parameters()):
        assert torch.equal(p_ref, p)
    for group_ref, group in zip(opt_ref.param_groups, opt.param_groups):
        for key in ("momentum", "hess"):
            ours = torch.cat([opt.state[p][key].reshape(-1) for p in group["params"]])
            assert torch.equal(group_ref[key], ours)


def test_load_ivon_opt_state_dict_saved_between_the_samples_of_a_step():
    """ivon-opt saved after one of three samples (its averages over all groups folded in, two
    param groups): loaded, the rest of the step and the next steps equal ivon-opt's."""
    model_ref = make_model(0)
    opt_ref = ivon.IVON(_ivon_opt_groups(model_ref), **HP, mc_samples=3)
    torch.manual_seed(10)
    train(model_ref, opt_ref, "official", 0, 2, mc=3)
    with opt_ref.sampled_params(train=True):
        opt_ref.zero_grad()
        loss_fn(model_ref, 2).backward()
    assert opt_ref.state["count"] == 1
    model = make_model(50)
    model.load_state_dict(model_ref.state_dict())
    opt = IVON(_ivon_opt_groups(model), lr=0.3, ess=7.0, mc_samples=3, backend="reference",
               rng="torch")
    opt.load_state_dict(roundtrip(opt_ref.state_dict()), step=2)
    assert opt.samples_taken == 1
    for one_model, one_opt in ((model_ref, opt_ref), (model, opt)):
        torch.manual_seed(20)
        for _ in range(2):   # the step's other two samples
            with one_opt.sampled_params(train=True):
                one_opt.zero_grad()
                loss_fn(one_model, 2).backward()
        one_opt.step()
        train(one_model, one_opt, "official", 3, 2, mc=3)
    for p_ref, p in zip(model_ref.parameters(), model.parameters()):
        assert torch.equal(p_ref, p)


def test_load_ivon_opt_state_dict_needs_step():
    model_ref = make_model(0)
    opt_ref = ivon.IVON(model_ref.parameters(), **HP)
    train(model_ref, opt_ref, "official", 0, 1)
    model = make_model(0)
    opt = IVON(model.parameters(), **HP, backend="reference", rng="torch")
    before = snapshot(model)
    with pytest.raises(ValueError, match="step"):
        opt.load_state_dict(opt_ref.state_dict())
    assert_params_equal(model, before)


# ----------------------------------------------------------------------------- 3. exceptions

class Boom(Exception):
    pass


def _failing_block(model, opt, kind):
    ctx = {"train": lambda: opt.sampled_params(train=True),
           "eval": lambda: opt.sampled_params(train=False),
           "mean": opt.mean_params}[kind]()
    with pytest.raises(Boom):
        with ctx:
            if kind == "train":
                opt.zero_grad()
            loss_fn(model, 3).backward()
            raise Boom()


@pytest.mark.parametrize("mode,kind", [("official", "train"), ("official", "eval"),
                                       ("official", "mean"), ("dropin", "eval"),
                                       ("dropin", "mean")])
def test_exception_in_block_leaves_everything(mode, kind):
    model_a, opt_a = build(mode)
    train(model_a, opt_a, mode, 0, 3)

    model_b, opt_b = build(mode)
    train(model_b, opt_b, mode, 0, 2)
    before_params, before_state = snapshot(model_b), opt_b.state_dict()
    if mode == "dropin":
        opt_b.zero_grad()   # the drop-in loop ends with zero_grad; keep grads as they were
    _failing_block(model_b, opt_b, kind)
    if mode == "dropin":
        opt_b.zero_grad()
    assert_params_equal(model_b, before_params)
    assert_state_dicts_equal(before_state, opt_b.state_dict())
    train(model_b, opt_b, mode, 2, 1)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def test_exception_mid_accumulation_then_training_continues():
    mc = 2
    model_a, opt_a = build("official", mc=mc)
    train(model_a, opt_a, "official", 0, 3, mc)

    model_b, opt_b = build("official", mc=mc)
    train(model_b, opt_b, "official", 0, 2, mc)
    with opt_b.sampled_params(train=True):
        opt_b.zero_grad()
        loss_fn(model_b, 2).backward()
    before = snapshot(model_b)
    _failing_block(model_b, opt_b, "train")
    assert_params_equal(model_b, before)
    with opt_b.sampled_params(train=True):
        opt_b.zero_grad()
        loss_fn(model_b, 2).backward()
    opt_b.step()
    assert_same_run(model_a, opt_a, model_b, opt_b)


# ----------------------------------------------------------------------------- 4. frozen / unused

@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_frozen_param_never_changes(mode):
    """A param frozen at construction is never perturbed nor updated, keeps its own storage
    (the same address) and costs no state (Note [params that wait] in _layout)."""
    model, opt = build(mode, frozen=True, unused=True)
    frozen = model.frozen.detach().clone()
    ptr = model.frozen.data_ptr()

    def check(_=None):
        assert torch.equal(model.frozen, frozen)
        assert "mean" not in opt.state.get(model.frozen, {})

    check()
    for i in range(3):
        if mode == "official":
            with opt.sampled_params(train=True):
                check()
                opt.zero_grad()
                loss_fn(model, i).backward()
            opt.step()
        else:
            dropin_iter(model, opt, i)
        check()
        with opt.sampled_params():
            check()
        with opt.mean_params():
            check()
    assert model.frozen.grad is None
    assert model.frozen.data_ptr() == ptr
    assert moved(model.body, [p.detach().clone() for p in make_model(0).body.parameters()])


def _zero_grad_expectation(mean, hess, t_steps, hp):
    """Plain-torch IVON for a param whose gradient is always zero (momentum stays 0)."""
    mean, hess, mom = mean.clone(), hess.clone(), torch.zeros_like(mean)
    b1, b2, wd, ess = hp["beta1"], hp["beta2"], hp["weight_decay"], hp["ess"]
    lr = hp["lr"] * (hp["hess_init"] + wd)
    for t in range(1, t_steps + 1):
        grad = torch.zeros_like(mean)
        mom = b1 * mom + (1.0 - b1) * grad
        f = ((grad * 0.0) * (hess + wd)) * ess
        hess = b2 * hess + (1.0 - b2) * f + (0.5 * (1 - b2) ** 2) * (hess - f).square() / (hess + wd)
        mean = mean - lr * torch.clip((mom / (1.0 - b1 ** t) + wd * mean) / (hess + wd),
                                      min=-float("inf"), max=float("inf"))
    return mean, mom, hess


def test_unused_param_gets_zero_gradient():
    steps = 4

    def run(set_to_none):
        model, opt = build("official", frozen=True, unused=True)
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        for i in range(steps):
            with opt.sampled_params(train=True):
                # a stale gradient of `unused` that the user then drops (set_to_none) or zeroes
                model.unused(batch(i)[0][:, :3]).sum().backward()
                if set_to_none:
                    model.zero_grad(set_to_none=True)
                else:
                    opt.zero_grad()
                loss_fn(model, i).backward()
                if set_to_none:
                    assert model.unused.weight.grad is None
            opt.step()
        return model, opt, init

    model_a, opt_a, init = run(set_to_none=True)
    model_b, opt_b, _ = run(set_to_none=False)
    assert_same_run(model_a, opt_a, model_b, opt_b)
    for p, name in ((model_a.unused.weight, "unused.weight"), (model_a.unused.bias, "unused.bias")):
        mean, mom, hess = _zero_grad_expectation(
            init[name], torch.full_like(init[name], HP["hess_init"]), steps, HP)
        assert torch.allclose(opt_a.state[p]["mean"], mean, rtol=1e-6, atol=0)
        assert torch.equal(opt_a.state[p]["momentum"], mom)
        assert torch.allclose(opt_a.state[p]["hess"], hess, rtol=1e-6, atol=0)
        assert not torch.equal(p, init[name])   # weight decay moved it
        assert torch.equal(p, opt_a.state[p]["mean"])


# ----------------------------------------------------------------------------- 5. eval stream

@pytest.mark.parametrize("rng", ["philox", "torch"])
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_eval_does_not_shift_training(mode, rng):
    model_a, opt_a = build(mode, rng=rng)
    torch.manual_seed(7)
    train(model_a, opt_a, mode, 0, 4)

    model_b, opt_b = build(mode, rng=rng)
    seen = []

    def evaluate(i):
        x, _ = batch(i)
        with torch.no_grad():
            with opt_b.sampled_params():
                seen.append(snapshot(model_b))
                model_b(x)
            with opt_b.sampled_params(train=False):
                seen.append(snapshot(model_b))
            with opt_b.mean_params():
                means = snapshot(model_b)
                model_b(x)
        s1, s2 = seen[-2], seen[-1]
        assert any(not torch.equal(a, b) for a, b in zip(s1, s2))
        assert any(not torch.equal(a, b) for a, b in zip(s1, means))
        for p, mean in zip(model_b.parameters(), means):
            assert torch.equal(opt_b.state[p]["mean"].to(p.dtype), mean)

    torch.manual_seed(7)
    evaluate(-1)
    train(model_b, opt_b, mode, 0, 4, hook=evaluate)
    assert_same_run(model_a, opt_a, model_b, opt_b)


def _big_param_optimizer(rng, mode="official", n=20000):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(n))
    target = torch.randn(n)
    opt = IVON([w], lr=0.1, ess=50.0, beta2=0.9, weight_decay=0.01, backend="reference",
               rng=rng, resample_on_step=(mode == "dropin"))
    return w, target, opt


def _assert_standard_normal(z):
    assert abs(z.mean().item()) < 0.04
    assert abs(z.std().item() - 1.0) < 0.03


@pytest.mark.parametrize("rng", ["philox", "torch"])
def test_eval_samples_have_the_posterior_spread(rng):
    w, target, opt = _big_param_optimizer(rng)
    for _ in range(3):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            (0.5 * ((w - target) ** 2).sum()).backward()
        opt.step()
    hess, mean = opt.state[w]["hess"], opt.state[w]["mean"]
    assert hess.std() > 0.01   # the check below is not trivially about a constant sigma
    zs = []
    for _ in range(2):
        with opt.sampled_params():
            zs.append(normalized_noise(w, mean, hess, 50.0, 0.01))
    for z in zs:
        _assert_standard_normal(z)
    assert abs(torch.corrcoef(torch.stack(zs))[0, 1].item()) < 0.05   # independent calls
    assert torch.equal(w, mean)


# ----------------------------------------------------------------------------- 6. drop-in mode

@pytest.mark.parametrize("rng", ["philox", "torch"])
def test_dropin_initial_sample_and_mean_params(rng):
    w, _, opt = _big_param_optimizer(rng, "dropin")
    torch.manual_seed(0)
    init = torch.randn(w.numel())
    mean = opt.state[w]["mean"]
    assert torch.equal(mean, init)
    _assert_standard_normal(normalized_noise(w, mean, opt.state[w]["hess"], 50.0, 0.01))
    sample = w.detach().clone()
    with opt.mean_params():
        assert torch.equal(w, mean)
    assert torch.equal(w, sample)


def test_dropin_matches_explicit_reference_computation():
    model = make_model(0)
    spec = two_group_spec(model)
    sim = Simulator(make_model(0), spec, "dropin", SEED)
    opt = IVON(opt_groups(model, spec), **HP, backend="reference", seed=SEED,
               resample_on_step=True)
    sim.assert_matches(model, opt)
    for i in range(4):
        dropin_iter(model, opt, i)
        sim.step(i)
        sim.assert_matches(model, opt)


@pytest.mark.parametrize("mc", [1, 3])
def test_official_matches_explicit_reference_computation(mc):
    model = make_model(0)
    spec = two_group_spec(model)
    sim = Simulator(make_model(0), spec, "official", SEED, mc=mc)
    opt = IVON(opt_groups(model, spec), **HP, backend="reference", seed=SEED, mc_samples=mc)
    for i in range(3):
        official_iter(model, opt, i, mc)
        sim.step(i)
        sim.assert_matches(model, opt)


# ----------------------------------------------------------------------------- 7. step(closure)

def test_step_closure_two_samples():
    mc = 2
    model_a, opt_a = build("official", mc=mc)
    model_b, opt_b = build("official", mc=mc)
    for i in range(3):
        recorded, losses = [], []

        def closure():
            recorded.append(snapshot(model_a))
            opt_a.zero_grad()
            loss = loss_fn(model_a, i)
            loss.backward()
            losses.append(loss.detach())
            return loss

        mean_before = [opt_a.state[p]["mean"].clone() for p in model_a.parameters()]
        result = opt_a.step(closure)
        assert len(recorded) == 2
        assert any(not torch.equal(a, b) for a, b in zip(*recorded))
        for snap in recorded:
            assert any(not torch.equal(a, m) for a, m in zip(snap, mean_before))
        assert torch.equal(result, (losses[0] + losses[1]) / 2)
        official_iter(model_b, opt_b, i, mc)
        assert_same_run(model_a, opt_a, model_b, opt_b)


def test_dropin_step_closure_matches_explicit_reference_computation():
    mc = 2
    model = make_model(0)
    spec = two_group_spec(model)
    sim = Simulator(make_model(0), spec, "dropin", SEED, mc=mc)
    opt = IVON(opt_groups(model, spec), **HP, backend="reference", seed=SEED, mc_samples=mc,
               resample_on_step=True)
    with pytest.raises(RuntimeError, match="closure"):
        loss_fn(model, 0).backward()
        opt.step()   # one sample per plain step: mc_samples=2 needs a closure
    for i in range(3):
        recorded = []

        def closure():
            recorded.append(snapshot(model))
            opt.zero_grad()
            loss = loss_fn(model, i)
            loss.backward()
            return loss

        opt.step(closure)
        sim.step(i)
        assert len(recorded) == mc and any(
            not torch.equal(a, b) for a, b in zip(*recorded))
        sim.assert_matches(model, opt)


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_step_closure_exception_leaves_optimizer(mode):
    mc = 2
    model_a, opt_a = build(mode, mc=mc)
    model_b, opt_b = build(mode, mc=mc)
    calls = []

    def make_closure(model, opt, fail_on):
        def closure():
            calls.append(None)
            if len(calls) == fail_on:
                raise Boom()
            opt.zero_grad()
            loss = loss_fn(model, 0)
            loss.backward()
            return loss
        return closure

    state = opt_b.state_dict()
    with pytest.raises(Boom):
        opt_b.step(make_closure(model_b, opt_b, fail_on=2))
    assert_state_dicts_equal(state, opt_b.state_dict())
    opt_a.step(make_closure(model_a, opt_a, fail_on=0))
    opt_b.step(make_closure(model_b, opt_b, fail_on=0))
    assert_same_run(model_a, opt_a, model_b, opt_b)


# ----------------------------------------------------------------------------- 8. bad input

BAD_ARGS = [
    ("lr", -0.1), ("lr", float("nan")), ("ess", 0.0), ("ess", -1.0), ("hess_init", 0.0),
    ("hess_init", -1.0), ("beta1", -0.1), ("beta1", 1.0), ("beta1", 1.1), ("beta2", -0.1), ("beta2", 1.5),
    ("weight_decay", -1e-4), ("clip_radius", 0.0), ("clip_radius", -1.0), ("mc_samples", 0),
    ("mc_samples", 1.5), ("mc_samples", 2.0), ("hess_approx", "fisher"), ("backend", "gpu"),
    ("rng", "numpy"), ("seed", -1), ("seed", 2 ** 64), ("seed", 1.5), ("seed", "7"),
    ("resample_on_step", "yes"),
]


@pytest.mark.parametrize("name,value", BAD_ARGS)
def test_bad_constructor_argument(name, value):
    model = make_model(0)
    before = snapshot(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    kwargs = dict(HP, backend="reference")
    kwargs[name] = value
    with pytest.raises(ValueError, match=name):
        IVON(model.parameters(), **kwargs)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert_params_equal(model, before)
    assert all(p.grad is None for p in model.parameters())


def test_rng_torch_with_triton_backend_is_rejected():
    model = make_model(0)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError) as info:
        IVON(model.parameters(), **HP, backend="triton", rng="torch")
    assert "rng" in str(info.value) and "backend" in str(info.value)
    assert [p.data_ptr() for p in model.parameters()] == ptrs


@pytest.mark.parametrize("name,value", [("lr", -1.0), ("ess", 0.0), ("beta2", 2.0),
                                        ("weight_decay", -0.5), ("hess_init", -2.0)])
def test_bad_group_values(name, value):
    model = make_model(0, extra=True)
    before = snapshot(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    groups = [dict(params=list(model.body.parameters())),
              dict(params=[model.scale, model.odd], **{name: value})]
    with pytest.raises(ValueError, match=name):
        IVON(groups, **HP, backend="reference")
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert_params_equal(model, before)

    opt = IVON(model.body.parameters(), **HP, backend="reference")
    with pytest.raises(ValueError, match=name):
        opt.add_param_group(dict(params=list(model.head.parameters()), **{name: value}))
    assert len(opt.param_groups) == 1
    assert [p.data_ptr() for p in model.head.parameters()] == ptrs[-2:]
    assert all(p not in opt.state for p in model.head.parameters())
    # the optimizer still works after the refused group
    official_iter(model, opt, 0)


@pytest.mark.parametrize("problem", ["duplicate", "non_leaf"])
def test_construction_failing_in_a_later_group_leaves_params(problem):
    model = make_model(0, extra=True)
    model.odd.grad = torch.ones_like(model.odd)
    grads = [p.grad for p in model.parameters()]
    before = snapshot(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    late = [model.body[0].weight] if problem == "duplicate" else [model.head.weight * 2]
    groups = [dict(params=list(model.body.parameters())),
              dict(params=[model.scale, model.odd]),
              dict(params=late)]
    with pytest.raises(ValueError):
        IVON(groups, **HP, backend="reference")
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert_params_equal(model, before)


def test_step_without_sample_raises():
    model, opt = build("official")
    with pytest.raises(RuntimeError) as info:
        opt.step()
    assert "sampled_params" in str(info.value) and "resample_on_step" in str(info.value)
    official_iter(model, opt, 0)
    with pytest.raises(RuntimeError, match="resample_on_step"):
        opt.step()   # the samples were used by the last step


def test_train_sample_in_dropin_mode_raises():
    model, opt = build("dropin")
    before, state = snapshot(model), opt.state_dict()
    with pytest.raises(RuntimeError):
        with opt.sampled_params(train=True):
            pass
    assert_params_equal(model, before)
    assert_state_dicts_equal(state, opt.state_dict())


# ----------------------------------------------------------------------------- 9. groups, schedulers

def test_two_groups_use_their_own_hyperparameters():
    # covered bitwise by the simulator tests; here check the groups really differ in effect
    model = make_model(0)
    spec = two_group_spec(model)
    spec[1][1]["lr"] = 0.0
    opt = IVON(opt_groups(model, spec), **HP, backend="reference")
    scale, odd = model.scale.detach().clone(), model.odd.detach().clone()
    body = [p.detach().clone() for p in model.body.parameters()]
    for i in range(2):
        official_iter(model, opt, i)
    assert torch.equal(model.scale, scale) and torch.equal(model.odd, odd)
    assert moved(model.body, body)
    assert not torch.equal(opt.state[model.odd]["hess"], torch.full_like(odd, HP["hess_init"]))


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_add_param_group_after_training(mode):
    model = make_model(0, extra=True)
    torch.manual_seed(1)
    base = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = IVON(base, **HP, backend="reference", resample_on_step=(mode == "dropin"))
    train(model, opt, mode, 0, 2)
    ptrs = [p.data_ptr() for p in base]
    head_init = [p.detach().clone() for p in model.head.parameters()]
    opt.add_param_group(dict(params=list(model.head.parameters()), lr=0.1))
    for p, init in zip(model.head.parameters(), head_init):
        assert torch.equal(opt.state[p]["mean"], init)
        if mode == "dropin":
            assert not torch.equal(p, init)   # holds a sample like every other param
    base_before = [p.detach().clone() for p in base] if mode == "official" else None
    train(model, opt, mode, 2, 3)
    assert [p.data_ptr() for p in base] == ptrs
    for p, init in zip(model.head.parameters(), head_init):
        assert not torch.equal(opt.state[p]["mean"], init)
        assert opt.state[p]["hess"].ne(HP["hess_init"]).any()
    if base_before is not None:
        assert moved(nn.ParameterList(base), base_before)


def test_add_param_group_matches_simulator():
    """The new group's params get global offsets after the existing ones (docs/DESIGN.md 3)."""
    model = make_model(0)
    spec = two_group_spec(model)
    sim = Simulator(make_model(0), spec, "official", SEED)
    named = dict(model.named_parameters())
    opt = IVON([named[n] for n in spec[0][0]], **spec[0][1], backend="reference", seed=SEED)
    opt.add_param_group(dict(params=[named[n] for n in spec[1][0]], **spec[1][1]))
    for i in range(3):
        official_iter(model, opt, i)
        sim.step(i)
        sim.assert_matches(model, opt)


def test_step_lr_scheduler_equals_manual_lr():
    steps = 6

    def run(schedule):
        model, opt = build("official")
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5) \
            if schedule == "scheduler" else None
        lrs = []
        for i in range(steps):
            if schedule == "manual":
                opt.param_groups[0]["lr"] = HP["lr"] * 0.5 ** (i // 2)
            lrs.append(opt.param_groups[0]["lr"])
            official_iter(model, opt, i)
            if scheduler is not None:
                scheduler.step()
        return model, opt, lrs

    model_a, opt_a, lrs_a = run("scheduler")
    model_b, opt_b, lrs_b = run("manual")
    model_c, opt_c, _ = run("constant")
    assert lrs_a == lrs_b and lrs_a[-1] == HP["lr"] * 0.25
    assert_same_run(model_a, opt_a, model_b, opt_b)
    assert not torch.equal(opt_a.state[model_a.scale]["mean"], opt_c.state[model_c.scale]["mean"])


def test_flat_layout_and_stable_storage():
    model = make_model(0, extra=True)
    spec = two_group_spec(model)
    opt = IVON(opt_groups(model, spec), **HP, backend="reference")

    def check():
        for group in opt.param_groups:
            params = group["params"]
            for attr in ("data", "grad"):
                tensors = [getattr(p, attr) for p in params]
                ptr = tensors[0].data_ptr()
                for t in tensors:
                    assert t.is_contiguous()
                    assert t.data_ptr() == ptr
                    ptr += t.numel() * t.element_size()
        return [(p.data_ptr(), p.grad.data_ptr()) for p in model.parameters()]

    ptrs = check()
    for i in range(3):
        with opt.sampled_params(train=True):
            assert check() == ptrs
            opt.zero_grad()
            loss_fn(model, i).backward()
        assert check() == ptrs
        opt.step()
        assert check() == ptrs
        opt.zero_grad()
        assert check() == ptrs
        assert all(p.grad.eq(0).all() for p in model.parameters())
    # a user who drops the grads: after the next step they are views into the buffer again
    with opt.sampled_params(train=True):
        model.zero_grad(set_to_none=True)
        loss_fn(model, 0).backward()
    opt.step()
    assert check() == ptrs


# ----------------------------------------------------------------------------- 10. user writes

@pytest.mark.parametrize("how", ["load_state_dict", "rebind_data"])
def test_user_writes_become_the_mean(how):
    model = make_model(0)
    spec = two_group_spec(model)
    sim = Simulator(make_model(0), spec, "official", SEED)
    opt = IVON(opt_groups(model, spec), **HP, backend="reference", seed=SEED)
    for i in range(2):
        official_iter(model, opt, i)
        sim.step(i)
    other = {n: p.detach().clone() for n, p in make_model(9).named_parameters()}
    if how == "load_state_dict":
        model.load_state_dict(other)
    else:
        for n, p in model.named_parameters():
            p.data = other[n].clone()
    sim.set_mean(other)
    named = dict(model.named_parameters())
    with opt.sampled_params(train=True):
        for n, p in named.items():
            assert torch.equal(opt.state[p]["mean"], other[n])
            hess = opt.state[p]["hess"]
            group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
            z = normalized_noise(p, other[n], hess, group["ess"], group["weight_decay"])
            assert z.abs().max() < 6 and z.abs().max() > 0   # a sample around the new weights
        opt.zero_grad()
        loss_fn(model, 2).backward()
    opt.step()
    sim.step(2)
    sim.assert_matches(model, opt)
    for i in range(3, 5):
        official_iter(model, opt, i)
        sim.step(i)
    sim.assert_matches(model, opt)


# ----------------------------------------------------------------------------- 11. bf16

def test_bf16_params_fp32_master_state():
    model = make_model(0, dtype=torch.bfloat16)
    torch.manual_seed(1)
    opt = IVON(model.parameters(), **dict(HP, lr=0.2), backend="reference")
    init = {n: p.detach().float().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        assert opt.state[p]["mean"].dtype == torch.float32
        assert p.dtype == torch.bfloat16
    losses = []
    for i in range(40):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss = loss_fn(model, 0, torch.bfloat16)
            loss.backward()
        losses.append(loss.item())
        opt.step()
        for p in model.parameters():
            assert p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16
            for key in ("mean", "momentum", "hess"):
                assert opt.state[p][key].dtype == torch.float32
            assert torch.equal(p, opt.state[p]["mean"].to(torch.bfloat16))
    assert sum(losses[-5:]) < sum(losses[:5])
    # the fp32 master mean keeps updates smaller than one bf16 ulp
    means = {n: opt.state[p]["mean"] for n, p in model.named_parameters()}
    assert any(not torch.equal(means[n], means[n].to(torch.bfloat16).float()) for n in means)
    assert any(not torch.equal(means[n], init[n]) for n in means)


@pytest.mark.parametrize("model_first", [True, False], ids=["model_then_opt", "opt_then_model"])
def test_drop_in_resume_in_either_load_order(model_first):
    """A drop-in checkpoint's model weights are a sample; loading them must not become the mean."""
    model_a, opt_a = build("dropin")
    for i in range(3):
        dropin_iter(model_a, opt_a, i)
    buffer = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "opt": opt_a.state_dict()}, buffer)
    for i in range(3, 5):
        dropin_iter(model_a, opt_a, i)

    torch.manual_seed(1234)
    model_b, opt_b = build("dropin", model_seed=5, opt_seed=99)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    load_checkpoint(model_b, opt_b, checkpoint, model_first)
    for i in range(3, 5):
        dropin_iter(model_b, opt_b, i)
    assert_same_run(model_a, opt_a, model_b, opt_b)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_resume_on_another_device(mode):
    """A CPU checkpoint loaded into a CUDA model and optimizer continues the same trajectory."""
    model_a, opt_a = build(mode)
    train(model_a, opt_a, mode, 0, 3)
    saved = roundtrip({"model": model_a.state_dict(), "opt": opt_a.state_dict()})
    train(model_a, opt_a, mode, 3, 2)

    model_b = make_model(5).cuda()
    opt_b = IVON(model_b.parameters(), **HP, backend="reference",
                 resample_on_step=(mode == "dropin"))
    model_b.load_state_dict(saved["model"])
    opt_b.load_state_dict(saved["opt"])
    for i in range(3, 5):
        if mode == "official":
            with opt_b.sampled_params(train=True):
                opt_b.zero_grad()
                x, y = batch(i)
                ((model_b(x.cuda()) - y.cuda()) ** 2).mean().backward()
            opt_b.step()
        else:
            x, y = batch(i)
            ((model_b(x.cuda()) - y.cuda()) ** 2).mean().backward()
            opt_b.step()
            opt_b.zero_grad()
    # same noise stream and state; only the devices' transcendental functions may differ by ulps
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pb.cpu(), pa, rtol=1e-4, atol=1e-5)
    assert opt_b.state_dict()["ivon"]["step"] == opt_a.state_dict()["ivon"]["step"]


# ----------------------------------------------------------------------------- review regressions

def test_float64_params_with_auto_use_the_reference_and_train():
    fp32, fp64 = nn.Parameter(torch.ones(3)), nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = IVON([fp32, fp64], lr=0.1, ess=10.0)
    assert opt.backends[("cpu", torch.float64)] == "reference"
    for _ in range(2):
        with opt.sampled_params(train=True):
            opt.zero_grad()
            (fp32.sum() + fp64.square().sum()).backward()
        opt.step()
    assert opt.state[fp64]["mean"].dtype == torch.float64
    assert not torch.equal(fp64.detach(), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("backend", ["cpu", "triton", "cuda"])
def test_explicit_backend_that_cannot_run_is_a_value_error_before_anything_moves(backend):
    param = nn.Parameter(torch.ones(2, dtype=torch.float64))
    pointer = param.data_ptr()
    with pytest.raises(ValueError, match="backend"):
        IVON([param], lr=0.1, ess=10.0, backend=backend)
    assert param.data_ptr() == pointer and param.grad is None


def test_tensor_and_numpy_hyperparameters():
    np = pytest.importorskip("numpy")
    param = nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="lr"):
        IVON([param], lr=torch.tensor([0.1, 0.2]), ess=10.0)
    assert IVON([param], lr=torch.tensor(0.1), ess=10.0, mc_samples=np.int64(2)).mc_samples == 2


def test_load_ivon_opt_state_dict_in_drop_in_mode_keeps_the_mean():
    model_ref = make_model(0)
    opt_ref = ivon.IVON(model_ref.parameters(), **HP)
    train(model_ref, opt_ref, "official", 0, 3)
    model = make_model(50)
    model.load_state_dict(model_ref.state_dict())   # ivon-opt's params are its mean
    opt = IVON(model.parameters(), **HP, backend="reference", resample_on_step=True)
    opt.load_state_dict(opt_ref.state_dict(), step=3)
    for p_ref, p in zip(model_ref.parameters(), model.parameters()):
        assert torch.equal(opt.state[p]["mean"], p_ref.detach())
        assert not torch.equal(p.detach(), p_ref.detach())   # the params hold a sample


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_add_param_group_in_the_middle_of_a_step(mode):
    model, opt = build(mode, mc=2)
    extra = nn.Parameter(torch.ones(4))
    if mode == "official":
        with opt.sampled_params(train=True):
            opt.zero_grad()
            loss_fn(model, 0).backward()
        with opt.sampled_params(train=True):   # a second sample: the averages are in use
            opt.zero_grad()
            loss_fn(model, 0).backward()
        opt.add_param_group({"params": [extra]})
        state = opt.state_dict()
        assert state["ivon"]["count"] == 1 and "avg_grad" in state["state"][len(state["state"]) - 1]
        extra.grad = torch.ones(4)
        opt.step()
    else:
        opt.add_param_group({"params": [extra]})
        loss_fn(model, 0).backward()
        extra.grad = torch.ones(4)
        opt.step(lambda: loss_fn(model, 0))
    with opt.mean_params():
        assert (extra.detach() < 1).all()   # a positive gradient moved it down


@pytest.mark.parametrize("mode", ["official", "dropin"])
def test_freezing_a_param_that_holds_a_sample_puts_its_mean_back(mode):
    model, opt = build(mode)
    train(model, opt, mode, 0, 2)
    param = model.odd
    if mode == "official":
        with opt.sampled_params(train=True):
            param.requires_grad_(False)         # frozen while it holds a sample
        expected = opt.state[param]["mean"].clone()
    else:
        assert not torch.equal(param.detach(), opt.state[param]["mean"])
        param.requires_grad_(False)
        expected = opt.state[param]["mean"].clone()
        with opt.mean_params():
            pass
    assert torch.equal(param.detach(), expected)
    # and it stays frozen at its mean (official: the block above was the step's first sample)
    with contextlib.ExitStack() as stack:
        if mode == "official":
            stack.enter_context(pytest.warns(UserWarning, match="training sample 2"))
        train(model, opt, mode, 2, 2)
    assert torch.equal(param.detach(), expected)


def test_state_dict_sees_user_writes():
    model, opt = build("official")
    with torch.no_grad():
        model.scale.copy_(torch.tensor(5.0))
    index = [name for name, _ in model.named_parameters()].index("scale")
    assert opt.state_dict()["state"][index]["mean"].item() == 5.0


def test_load_state_dict_checks_before_changing_anything():
    model, opt = build("official")
    train(model, opt, "official", 0, 2)
    good = opt.state_dict()
    other_model, other = build("official", model_seed=3, opt_seed=4)
    train(other_model, other, "official", 0, 1)
    before = other.state_dict()
    broken = copy.deepcopy(good)
    del broken["state"][len(broken["state"]) - 1]["hess"]
    broken["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match="hess"):
        other.load_state_dict(broken)
    assert_state_dicts_equal(before, other.state_dict())
    _, torch_rng = build("official", rng="torch")
    with pytest.raises(ValueError, match="rng"):
        torch_rng.load_state_dict(good)
