"""Study: does IVON with bf16 optimizer state learn the same posterior as with float32 state?
(issue 11; docs/DESIGN.md section 16)

``IVON(state_dtype=torch.bfloat16)`` stores the momentum and the Hessian estimate h in bf16, by
stochastic rounding (unbiased: E[round(x)] = x), and keeps the mean in float32. Two checks, each
float32 state against bf16 state with everything else equal (the same data, initialization,
batches and, per seed, the same Philox noise draws: only the rounding differs):

1. Bayesian linear regression with its closed-form posterior: blr.py's problem and its main
   configuration (4000 full-batch steps of the official loop, 4 MC samples, beta2 0.999, cosine
   lr), on 5 data sets with 4 noise seeds each. IVON is elementwise, so the 20 runs train as rows
   of one weight tensor [20, d] whose loss is the sum of the runs' losses: each row gets exactly
   its own problem's gradient and its own noise, and one optimizer step advances all 20 runs (a
   step over 320 elements costs about what one over 16 does: the per-call overhead dominates,
   most of all on the reference backend). Reported per run with blr.py's errors against the
   closed form, and the excess of the variational objective over its optimum (the "ELBO gap",
   in nats).

   A third arm stores the same bf16 state rounded to nearest instead of stochastically: the
   baseline that shows why the rounding must be stochastic. h moves by (1 - beta2)(f - h) per
   step, mostly below half a bf16 ulp for beta2 near 1, so round-to-nearest loses most
   increments: h stalls (the language model's decay from hess_init), or moves only by the rare
   large increments, mostly upward (the regression's skewed estimates): either way biased.
   (Emulated by patching ``ivon_fast.reference.stochastic_round_bf16`` inside this script only,
   on the reference backend; ``round_to_nearest`` below.)

   What bf16 costs, predicted: stochastic rounding adds a zero-mean error of variance about
   u |d| to each update d = (1 - beta2)(f - h) of h (u: the bf16 ulp at h, 2^-8 to 2^-7 of h;
   for |d| << u). The beta2 average forgets these errors as it forgets everything else, so h
   carries, in the stationary state, a rounding variance u (1 - beta2) E|f - h| / (1 - beta2^2)
   = u E|f - h| / (1 + beta2): the same for every beta2 near 1, unlike the Monte-Carlo noise of
   h, (1 - beta2) / (1 + beta2) var(f) / K, which a longer average removes. sigma's relative
   error is half h's. ``predicted_rounding_error`` computes it per problem (with the exact
   variance of rounding, also for |d| ~ u, and f simulated at the optimum); the bf16 floor is
   the root sum of squares with blr.py's float32 floor.

2. A small character-level language model: bench/gpt.py's GPT (2 layers, width 32, 2 heads,
   context 32: 26.5k params, tied head) on sentences from the small random grammar of
   examples/gpt_hf_trainer.py (400 training sentences, 100 held-out ones; nothing downloaded),
   trained in the drop-in loop (``resample_on_step=True``, as a language model trains) for 800
   steps of 16 windows, lr 5 with warmup and cosine decay, gradient clipping 1, beta2 0.998,
   ess = the training characters; 5 seeds, float32 against bf16 state (and one seed rounded to
   nearest). Reported: training and validation loss at the posterior mean, the validation loss
   of the 8-sample predictive, and the posterior std and Hessian estimate over the weights.

Every arm uses the backend ``backend='auto'`` picks for it (the compiled CPU kernel on a CPU,
also for bf16 state), except round-to-nearest, which runs on the reference backend.

Run: ``python docs/studies/bf16_state.py`` (about 3 minutes of CPU, half of it the
round-to-nearest arms on the reference backend), ``--quick`` (about 20 s; the test),
``--no-rtn`` (without the round-to-nearest arms).
"""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
# the repository root, for bench/gpt.py's model and examples/gpt_hf_trainer.py's grammar
# (appended: an installed ivon_fast goes first)
sys.path.append(str(HERE.parent.parent))
import _common  # noqa: E402
import blr  # noqa: E402
from examples.gpt_hf_trainer import sentences  # noqa: E402

# name: (state_dtype, rounding of the bf16 state)
ARMS = {"fp32": (torch.float32, None), "bf16": (torch.bfloat16, "stochastic"),
        "bf16 round-to-nearest": (torch.bfloat16, "nearest")}


# ---------------------------------------------------------------------------- the three arms

@contextlib.contextmanager
def round_to_nearest():
    """Inside, the reference backend stores bf16 state rounded to nearest (even) instead of
    stochastically. Patches ``ivon_fast.reference.stochastic_round_bf16``, which the reference's
    update looks up at every call; yields a one-element list counting the calls, so a run can
    check that the patch took effect (a backend that rounds by itself would bypass it)."""
    from ivon_fast import reference

    original, calls = reference.stochastic_round_bf16, [0]

    def nearest(values, random16):
        calls[0] += 1
        return values.to(torch.bfloat16)

    reference.stochastic_round_bf16 = nearest
    try:
        yield calls
    finally:
        reference.stochastic_round_bf16 = original


@contextlib.contextmanager
def arm_optimizer(arm: str, params, **options):
    """An ``ivon_fast.IVON`` for one arm, the backend left to 'auto' (the round-to-nearest arm
    runs on the reference backend: the patch lives there). Yields (optimizer, backend name)."""
    import ivon_fast

    state_dtype, rounding = ARMS[arm]
    if rounding == "nearest":
        with round_to_nearest() as calls:
            opt = ivon_fast.IVON(params, backend="reference", state_dtype=state_dtype, **options)
            yield opt, "reference, rounding to nearest"
        if calls[0] == 0:
            raise RuntimeError("the round-to-nearest patch was never called")
        return
    opt = ivon_fast.IVON(params, state_dtype=state_dtype, **options)
    yield opt, ", ".join(sorted(set(opt.backends.values())))


def hess_of(opt) -> torch.Tensor:
    """IVON's Hessian estimate over all weights, as float32 (it may be stored in bf16)."""
    return torch.cat([opt.state[p]["hess"].float().flatten() for g in opt.param_groups
                      for p in g["params"]])


# ---------------------------------------------------------------------------- 1. BLR

def elbo_gap(mean, sigma, problem, weight_decay: float) -> float:
    """KL(q || p) - min over diagonal q of KL(q || p), in nats: how far (mean, sigma) is from the
    optimum of IVON's variational objective (blr.py's docstring; p = N(mu, P^-1)):
    0.5 [sum_j (P_jj s_j^2 - 1 - log(P_jj s_j^2)) + (m - mu)^T P (m - mu)]."""
    n = problem["x"].shape[0]
    precision = n * (problem["hess"] + weight_decay * torch.eye(len(problem["mu"]),
                                                                dtype=torch.float64))
    r = precision.diagonal() * sigma.double() ** 2
    z = mean.double() - problem["mu"]
    return float(0.5 * ((r - 1 - r.log()).sum() + z @ precision @ z))


def predicted_rounding_error(problem, beta2: float, mc_samples: int, weight_decay: float,
                             draws: int = 20000) -> float:
    """The RMS (over coordinates) relative error of sigma that bf16 state's stochastic rounding
    of h adds (module docstring). At the optimum (h_j = H_jj, m = mu, where the gradient of the
    mean loss is -delta mu, not 0) an update moves h_j by d = (1 - beta2)(f - h) + (1 - beta2)^2
    (h - f)^2 / (2 (h + delta)), f the 'price' estimate averaged over the step's K samples
    (simulated here); rounding h + d stochastically to the bf16 grid of spacing u adds the
    variance u^2 x (1 - x), x = frac(|d| / u) (about u |d| for |d| << u), and the beta2 average
    keeps 1 / (1 - beta2^2) times the mean of that."""
    H, sigma, mu = problem["hess"], problem["sigma"], problem["mu"]
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(draws, mc_samples, len(mu), generator=g, dtype=torch.float64)
    grad = -weight_decay * mu + (eps * sigma) @ H          # the gradient at m + sigma * eps
    f = (eps * grad / sigma).mean(1)                        # f_j = eps_j g_j / sigma_j
    h = H.diagonal()
    d = (1 - beta2) * (f - h) + 0.5 * (1 - beta2) ** 2 * (h - f) ** 2 / (h + weight_decay)
    ulp = 2.0 ** (torch.floor(torch.log2(h)) - 7)           # bf16: 8 significant bits
    x = (d.abs() / ulp).frac()
    var_h = (ulp ** 2 * x * (1 - x)).mean(0) / (1 - beta2 ** 2)
    return float((0.25 * var_h / (h + weight_decay) ** 2).mean().sqrt())


def train_blr(arm: str, problems: list, replicas: int, *, steps, mc_samples, lr, hess_init,
              beta2, weight_decay, noise_std, seed, log_every=100) -> dict:
    """blr.train's full-batch official loop, for len(problems) x replicas runs at once (module
    docstring): row p * replicas + r of the weight is problem p's run r, whose noise is its own.
    Returns the posterior per run ([P, R, d] mean and sigma), sigma's error over the steps (mean
    and std over the runs) and the seconds."""
    x = torch.stack([pr["x"] for pr in problems])           # [P, N, d]
    y = torch.stack([pr["y"] for pr in problems])           # [P, N]
    count, n, d = x.shape
    weight = torch.nn.Parameter(torch.zeros(count * replicas, d))  # blr.train's start: 0
    options = dict(lr=lr, ess=float(n), hess_init=hess_init, beta2=beta2,
                   weight_decay=weight_decay, mc_samples=mc_samples, seed=seed)

    def posterior(opt):
        post = opt.posterior()
        return (post.mean[0].view(count, replicas, d), post.std[0].view(count, replicas, d))

    exact = torch.stack([pr["sigma"] for pr in problems])[:, None]      # [P, 1, d]

    def sigma_errors(opt):  # blr.errors' sigma_rel_err_rms of every run
        return (posterior(opt)[1].double() / exact - 1).pow(2).mean(-1).sqrt().flatten()

    trajectory = []
    with arm_optimizer(arm, [weight], **options) as (opt, backend), _common.Timer() as timer:
        for t in range(steps):
            for group in opt.param_groups:
                group["lr"] = _common.cosine(lr, t, steps)
            for _ in range(mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    pred = torch.einsum("pnd,prd->prn", x, weight.view(count, replicas, d))
                    # the sum over runs of blr.train's mean loss
                    (0.5 / noise_std ** 2 * (pred - y[:, None]).pow(2).mean(-1)).sum().backward()
            opt.step()
            if (t + 1) % log_every == 0 or t + 1 == steps:
                err = sigma_errors(opt)
                trajectory.append({"step": t + 1, "sigma_rel_err_rms": float(err.mean()),
                                   "sigma_rel_err_rms_std": float(err.std())})
        mean, sigma = posterior(opt)
        hess = hess_of(opt).view(count, replicas, d)
    return {"mean": mean.detach().clone(), "sigma": sigma.detach().clone(), "hess": hess,
            "trajectory": trajectory, "seconds": timer.seconds, "backend": backend}


def blr_part(args, arms) -> dict:
    """Part 1: every arm on the same problems and noise seeds; per-run errors, per-arm
    summaries, the paired comparison with float32, and the predicted floors."""
    hyper = dict(steps=args.steps, mc_samples=args.mc_samples, lr=args.lr,
                 hess_init=args.hess_init, beta2=args.beta2, weight_decay=args.weight_decay,
                 noise_std=args.noise_std)
    problems = [blr.make_problem(seed, args.d, args.n, args.noise_std, args.rho,
                                 args.weight_decay) for seed in range(args.seeds)]
    results = {}
    for arm in arms:
        result = train_blr(arm, problems, args.replicas, seed=args.noise_seed, **hyper)
        runs = []
        for p, problem in enumerate(problems):
            for r in range(args.replicas):
                mean, sigma = result["mean"][p, r], result["sigma"][p, r]
                runs.append({"data_seed": p, "replica": r, **blr.errors(mean, sigma, problem),
                             "elbo_gap": elbo_gap(mean, sigma, problem, args.weight_decay)})
        results[arm] = dict(result, runs=runs)
        print(f"BLR {arm:22s} {result['seconds']:6.1f}s ({result['backend']})  sigma rel err "
              f"rms {_common.pm([r['sigma_rel_err_rms'] for r in runs], 4)}", flush=True)

    # paired with float32: the same data and noise draws, only the rounding differs; against
    # it, float32 runs on the same data with other noise (replica r against r + 1)
    fp32 = results["fp32"]
    paired = {}
    for arm in arms:
        ratio = (results[arm]["sigma"] / fp32["sigma"] - 1).pow(2).mean(-1).sqrt().flatten()
        delta = (results[arm]["mean"] - fp32["mean"]) / torch.stack([pr["sigma"] for pr in
                                                                   problems])[:, None].float()
        paired[arm] = {"sigma_rel_diff_rms": ratio.tolist(),
                       "mean_diff_rms_sigma": delta.pow(2).mean(-1).sqrt().flatten().tolist()}
    if args.replicas > 1:
        other = fp32["sigma"].roll(1, dims=1)
        moved = fp32["mean"].roll(1, dims=1)
        sig = torch.stack([pr["sigma"] for pr in problems])[:, None].float()
        paired["fp32, other noise"] = {
            "sigma_rel_diff_rms": (other / fp32["sigma"] - 1).pow(2).mean(-1).sqrt().flatten()
            .tolist(),
            "mean_diff_rms_sigma": ((moved - fp32["mean"]) / sig).pow(2).mean(-1).sqrt()
            .flatten().tolist()}

    predicted_fp32 = [blr.predicted_sigma_error(pr, args.beta2, args.mc_samples, args.steps,
                                                args.hess_init, args.weight_decay)
                      for pr in problems]
    rounding = [predicted_rounding_error(pr, args.beta2, args.mc_samples, args.weight_decay)
                for pr in problems]
    predicted = {"fp32": predicted_fp32, "rounding": rounding,
                 "bf16": [math.hypot(a, b) for a, b in zip(predicted_fp32, rounding)]}
    return {"problems": problems, "results": results, "paired": paired, "predicted": predicted}


BLR_KEYS = [("mean_err_rms_sigma", "mean error, RMS (in exact sigma)", 4),
            ("sigma_rel_err_rms", "sigma rel. error, RMS", 4),
            ("sigma_rel_err_max", "sigma rel. error, max", 4),
            ("sigma_bias", "sigma bias (mean rel.)", 4),
            ("elbo_gap", "ELBO gap (nats)", 3)]


def blr_tables(blr_record: dict, args) -> str:
    results, paired, predicted = (blr_record[k] for k in ("results", "paired", "predicted"))
    runs = {arm: results[arm]["runs"] for arm in results}
    col = lambda arm, key: [r[key] for r in runs[arm]]  # noqa: E731
    rows = []
    for arm in results:
        floor = predicted["fp32"] if arm == "fp32" else predicted["bf16"]
        rows.append([arm, len(runs[arm])] + [_common.pm(col(arm, key), digits)
                                             for key, _, digits in BLR_KEYS]
                    + ["–" if arm.endswith("nearest") else _common.pm(floor, 4),
                       f"{results[arm]['seconds']:.0f}"])
    table = _common.markdown_table(
        ["state", "runs"] + [title for _, title, _ in BLR_KEYS]
        + ["predicted sigma rel. error, RMS", "seconds (all runs)"], rows)

    # bf16 - fp32: the difference of the means against its standard error over the runs, and
    # the paired per-run differences (same data and noise) against other-noise fp32 runs
    diff_rows = []
    for arm in [a for a in results if a != "fp32"]:
        for key, title, digits in BLR_KEYS:
            mine, ref = col(arm, key), col("fp32", key)
            m1, s1 = _common.mean_std(mine)
            m2, s2 = _common.mean_std(ref)
            se = math.sqrt((s1 ** 2 + s2 ** 2) / len(mine))
            d = [a - b for a, b in zip(mine, ref)]
            diff_rows.append([arm, title, f"{m1 - m2:+.{digits}f}",
                              f"{se:.{digits}f}", f"{(m1 - m2) / se:+.1f}" if se else "–",
                              _common.pm(d, digits), f"{s2:.{digits}f}"])
    diff = _common.markdown_table(
        ["state", "metric", "difference of means (vs fp32)", "its std. error",
         "in std. errors", "paired difference, mean ± std", "fp32's spread (std over runs)"],
        diff_rows)
    pair_rows = [[name, _common.pm(v["sigma_rel_diff_rms"], 4),
                  _common.pm(v["mean_diff_rms_sigma"], 4)]
                 for name, v in paired.items() if name != "fp32"]
    pairs = _common.markdown_table(
        ["against the fp32 run", "sigma: RMS rel. difference per run",
         "mean: RMS difference per run (in exact sigma)"], pair_rows)
    h = results["fp32"]["hess"]
    lines = [table, "", diff, "", pairs, "",
             f"Predicted sigma rel. error from bf16's stochastic rounding alone: "
             f"{_common.pm(predicted['rounding'], 4)} (float32's Monte-Carlo floor: "
             f"{_common.pm(predicted['fp32'], 4)}); the Hessian estimate spans "
             f"{float(h.min()):.2f}..{float(h.max()):.2f}."]
    if "bf16 round-to-nearest" in results:
        rtn = results["bf16 round-to-nearest"]["hess"]
        lines.append(f"Round-to-nearest: h after {args.steps} steps spans "
                     f"{float(rtn.min()):.3g}..{float(rtn.max()):.3g} (hess_init "
                     f"{args.hess_init}); float32 state: {float(h.min()):.3g}.."
                     f"{float(h.max()):.3g}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- 2. language model

def char_data(context: int, train_sentences: int = 400, val_sentences: int = 100) -> dict:
    """Windows of context + 1 characters (input and shifted target): training windows every
    context / 2 characters, and non-overlapping ones for evaluating on each text."""
    train_text, val_text = sentences(train_sentences, 0), sentences(val_sentences, 1)
    vocabulary = sorted(set(train_text + val_text))
    encode = lambda text: torch.tensor([vocabulary.index(c) for c in text])  # noqa: E731
    windows = lambda text, stride: encode(text).unfold(0, context + 1, stride)  # noqa: E731
    return {"vocab": len(vocabulary), "train_chars": len(train_text),
            "train": windows(train_text, context // 2), "train_eval": windows(train_text, context),
            "val": windows(val_text, context)}


def lm_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """bench.gpt.GPT's forward up to its tied head: logits [B, T, vocab]."""
    positions = torch.arange(tokens.shape[1])
    x = model.wte(tokens) + model.wpe(positions)
    for block in model.blocks:
        x = block(x)
    return torch.nn.functional.linear(model.ln_f(x), model.wte.weight)


def lm_loss(model, opt, windows: torch.Tensor, samples: int, seed: int = 0) -> float:
    """Mean next-character NLL over ``windows``: at the posterior mean (samples=0) or of the
    predictive averaged over ``samples`` posterior samples (``ivon_fast.predictive.predict``)."""
    from ivon_fast.predictive import predict

    data = torch.utils.data.TensorDataset(windows[:, :-1], windows[:, 1:])
    loader = torch.utils.data.DataLoader(data, batch_size=256, shuffle=False)
    forward = lambda m, batch: (lm_logits(m, batch[0]).flatten(0, 1),  # noqa: E731
                                batch[1].flatten())
    probs, targets = predict(model, opt, loader, samples=samples, seed=seed, progress=False,
                             forward=forward)
    return float(-probs.gather(1, targets[:, None]).double().clamp_min(1e-30).log().mean())


def train_lm(arm: str, seed: int, data: dict, args) -> dict:
    """IVON in the drop-in loop on the character model; the seed sets the initialization, the
    batches and IVON's noise (the same for every arm)."""
    from bench.gpt import GPT, GPTConfig

    config = GPTConfig(layers=2, width=args.lm_width, heads=2, context=args.lm_context,
                       vocab=data["vocab"])
    torch.manual_seed(seed)
    model = GPT(config)
    g = torch.Generator().manual_seed(seed)
    steps, warmup, lr = args.lm_steps, max(1, args.lm_steps // 20), args.lm_lr
    options = dict(lr=lr, ess=float(data["train_chars"]), hess_init=args.lm_hess_init,
                   beta2=args.lm_beta2, weight_decay=1e-4, seed=seed, resample_on_step=True)
    curve = []
    with arm_optimizer(arm, model.parameters(), **options) as (opt, backend), \
            _common.Timer() as timer:
        for t in range(steps):
            for group in opt.param_groups:
                group["lr"] = min(1.0, (t + 1) / warmup) * _common.cosine(lr, t, steps)
            batch = data["train"][torch.randint(len(data["train"]), (args.lm_batch,),
                                                generator=g)]
            loss = model(batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad()
            if (t + 1) % args.lm_eval_every == 0 or t + 1 == steps:
                h = hess_of(opt)
                curve.append({"step": t + 1, "train_loss_sample": loss.item(),
                              "val_loss_mean": lm_loss(model, opt, data["val"], 0),
                              "hess_median": float(h.median())})
        result = {"arm": arm, "seed": seed, "backend": backend,
                  "params": sum(p.numel() for p in model.parameters()),
                  "train_loss_mean": lm_loss(model, opt, data["train_eval"], 0),
                  "val_loss_mean": lm_loss(model, opt, data["val"], 0),
                  "val_loss_predictive": lm_loss(model, opt, data["val"], args.lm_samples,
                                                 seed=seed),
                  "curve": curve}
        std = torch.cat([s.flatten() for s in opt.posterior().std])
        hess = hess_of(opt)
    result["seconds"] = timer.seconds   # training and evaluation
    q = torch.tensor([0.01, 0.5, 0.99])
    result.update({"sigma_quantiles": std.quantile(q).tolist(),
                   "hess_quantiles": hess.quantile(q).tolist()})
    return result, std


def lm_part(args, arms) -> dict:
    data = char_data(args.lm_context)
    runs, stds = [], {}
    for seed in range(args.lm_seeds):
        for arm in arms:
            if arm.endswith("nearest") and seed >= args.lm_rtn_seeds:
                continue
            result, std = train_lm(arm, seed, data, args)
            runs.append(result)
            stds[arm, seed] = std
            print(f"LM  {arm:22s} seed {seed} {result['seconds']:5.1f}s ({result['backend']})"
                  f"  val loss at mean {result['val_loss_mean']:.4f}, predictive "
                  f"{result['val_loss_predictive']:.4f}, median sigma "
                  f"{result['sigma_quantiles'][1]:.5f}", flush=True)
    # per-weight sigma, paired with float32 of the same seed
    for run in runs:
        ratio = stds[run["arm"], run["seed"]] / stds["fp32", run["seed"]] - 1
        run["sigma_rel_diff_rms_vs_fp32"] = float(ratio.pow(2).mean().sqrt())
    return {"data": {k: v for k, v in data.items() if isinstance(v, int)}, "runs": runs,
            "stds": stds}


LM_KEYS = [("train_loss_mean", "train loss at mean", 4), ("val_loss_mean", "val. loss at mean", 4),
           ("val_loss_predictive", "val. loss, predictive", 4)]


def lm_tables(lm_record: dict, args) -> str:
    runs = lm_record["runs"]
    arms = list(dict.fromkeys(r["arm"] for r in runs))
    mine = lambda arm: [r for r in runs if r["arm"] == arm]  # noqa: E731
    rows = []
    for arm in arms:
        rs = mine(arm)
        rows.append([arm, len(rs)] + [_common.pm([r[k] for r in rs], d) for k, _, d in LM_KEYS]
                    + [_common.pm([r["sigma_quantiles"][1] for r in rs], 5),
                       _common.pm([r["sigma_quantiles"][0] for r in rs], 5) + " .. "
                       + _common.pm([r["sigma_quantiles"][2] for r in rs], 5),
                       _common.pm([r["hess_quantiles"][1] for r in rs], 4),
                       "–" if arm == "fp32" else _common.pm(
                           [r["sigma_rel_diff_rms_vs_fp32"] for r in rs], 4),
                       _common.pm([r["seconds"] for r in rs], 1)])
    table = _common.markdown_table(
        ["state", "seeds"] + [title for _, title, _ in LM_KEYS]
        + ["median sigma", "sigma 1% .. 99% quantile", "median h",
           "sigma vs fp32, RMS rel. difference per weight", "seconds"], rows)
    diff_rows = []
    fp32 = {r["seed"]: r for r in mine("fp32")}
    for arm in arms[1:]:
        for key, title, digits in LM_KEYS:
            d = [r[key] - fp32[r["seed"]][key] for r in mine(arm)]
            spread = _common.mean_std([r[key] for r in mine("fp32")])[1]
            diff_rows.append([arm, title, _common.pm(d, digits) if len(d) > 1
                              else f"{d[0]:+.{digits}f}", f"{spread:.{digits}f}"])
    diff = _common.markdown_table(
        ["state", "metric", "paired difference to fp32 (same seed)",
         "fp32's seed-to-seed spread (std)"], diff_rows)
    return table + "\n\n" + diff


# ---------------------------------------------------------------------------- main

def main(argv=None):
    p = _common.parser(__doc__)
    g = p.add_argument_group("Bayesian linear regression (blr.py's main configuration)")
    g.add_argument("--d", type=int, default=16)
    g.add_argument("--n", type=int, default=1000)
    g.add_argument("--noise-std", type=float, default=0.5)
    g.add_argument("--rho", type=float, default=0.7)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--steps", type=int, default=4000)
    g.add_argument("--mc-samples", type=int, default=4)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--hess-init", type=float, default=1.0)
    g.add_argument("--beta2", type=float, default=0.999)
    g.add_argument("--seeds", type=int, default=5, help="data sets (blr.make_problem's seeds)")
    g.add_argument("--replicas", type=int, default=4, help="noise seeds per data set")
    g.add_argument("--noise-seed", type=int, default=0, help="IVON's seed (all arms)")
    g = p.add_argument_group("language model")
    g.add_argument("--lm-seeds", type=int, default=5)
    g.add_argument("--lm-rtn-seeds", type=int, default=1,
                   help="seeds of the round-to-nearest arm")
    g.add_argument("--lm-steps", type=int, default=800)
    g.add_argument("--lm-batch", type=int, default=16)
    g.add_argument("--lm-context", type=int, default=32)
    g.add_argument("--lm-width", type=int, default=32)
    g.add_argument("--lm-lr", type=float, default=5.0)
    g.add_argument("--lm-hess-init", type=float, default=1.0)
    g.add_argument("--lm-beta2", type=float, default=0.998)
    g.add_argument("--lm-samples", type=int, default=8, help="samples of the predictive")
    g.add_argument("--lm-eval-every", type=int, default=100)
    p.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest arms")
    args = p.parse_args(argv)
    if args.quick:
        # BLR: 1500 steps of one sample, beta2 0.995, and hess_init 16 (above every H_jj): from
        # hess_init 1 the first steps overshoot the mean and inflate h, which some of the 20
        # runs do not forget in so few steps; no round-to-nearest arm (at beta2 0.995 the
        # increments of h are not below half an ulp, so it does not freeze h)
        args.steps, args.mc_samples, args.beta2, args.hess_init = 1500, 1, 0.995, 16.0
        args.seeds, args.replicas = 4, 5
        args.lm_seeds, args.lm_steps, args.lm_eval_every, args.lm_samples = 1, 60, 30, 2
    _common.setup(args)
    import matplotlib.pyplot as plt

    arms = [a for a in ARMS if not (args.no_rtn and a.endswith("nearest"))]
    blr_record = blr_part(args, arms[:2] if args.quick else arms)
    lm_record = lm_part(args, arms)
    blr_report, lm_report = blr_tables(blr_record, args), lm_tables(lm_record, args)
    report = blr_report + "\n\n" + lm_report
    print()
    print(f"Bayesian linear regression: d={args.d}, N={args.n}, s={args.noise_std}, "
          f"rho={args.rho}, delta={args.weight_decay}; {args.steps} full-batch steps, "
          f"mc_samples={args.mc_samples}, lr={args.lr} (cosine to 0), hess_init="
          f"{args.hess_init}, beta2={args.beta2}; {args.seeds} data sets x {args.replicas} "
          "noise seeds")
    print(f"Language model: {lm_record['runs'][0]['params']} params, {args.lm_steps} steps of "
          f"{args.lm_batch} x {args.lm_context} characters, lr={args.lm_lr}, beta2="
          f"{args.lm_beta2}, hess_init={args.lm_hess_init}, ess={lm_record['data']['train_chars']}")
    print()
    print(report)

    # ---- figure
    colors = {"fp32": "C0", "bf16": "C1", "bf16 round-to-nearest": "C3"}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.6))
    problems, results = blr_record["problems"], blr_record["results"]
    exact = torch.stack([pr["sigma"] for pr in problems])[:, None].expand(
        -1, args.replicas, -1)
    for k, (arm, result) in enumerate(results.items()):   # float32 drawn on top
        axes[0].scatter(exact.flatten(), (result["sigma"] / exact).flatten(), s=6, alpha=0.6,
                        color=colors[arm], label=arm, zorder=3 - k)
    axes[0].axhline(1, color="k", lw=0.8)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("closed-form sigma (best diagonal Gaussian)")
    axes[0].set_ylabel("learned sigma / closed form")
    axes[0].set_title(f"BLR: sigma of every weight and run\n({args.seeds} data sets x "
                      f"{args.replicas} noise seeds)")
    axes[0].legend(fontsize=8)
    floors = {"fp32": blr_record["predicted"]["fp32"], "bf16": blr_record["predicted"]["bf16"]}
    for arm, result in results.items():
        steps = [point["step"] for point in result["trajectory"]]
        err = torch.tensor([point["sigma_rel_err_rms"] for point in result["trajectory"]])
        spread = torch.tensor([point["sigma_rel_err_rms_std"] for point in result["trajectory"]])
        axes[1].plot(steps, err, color=colors[arm], label=arm)
        axes[1].fill_between(steps, err - spread, err + spread, color=colors[arm], alpha=0.2)
        if arm in floors:
            axes[1].axhline(_common.mean_std(floors[arm])[0], color=colors[arm], ls=":", lw=1)
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("sigma rel. error, RMS over weights")
    axes[1].set_title("BLR: sigma's error during training\n(mean ± std over runs; dotted: "
                      "predicted floor)")
    axes[1].legend(fontsize=8)
    for run in lm_record["runs"]:
        steps = [point["step"] for point in run["curve"]]
        style = {"fp32": "-", "bf16": "--", "bf16 round-to-nearest": ":"}[run["arm"]]
        label = run["arm"] if run["seed"] == 0 else None
        axes[2].plot(steps, [pt["val_loss_mean"] for pt in run["curve"]], style,
                     color=colors[run["arm"]], label=label, lw=1.2)
        axes[3].plot(steps, [pt["hess_median"] for pt in run["curve"]], style,
                     color=colors[run["arm"]], label=label, lw=1.2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("validation loss at the posterior mean (nats/char)")
    axes[2].set_title(f"character LM: validation loss\n({args.lm_seeds} seeds per arm)")
    axes[2].legend(fontsize=8)
    axes[3].set_yscale("log")
    axes[3].set_xlabel("step")
    axes[3].set_ylabel("median Hessian estimate h over the weights")
    axes[3].set_title("character LM: IVON's Hessian estimate\n(posterior std = "
                      "1/sqrt(ess (h + weight decay)))")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    def plain(result):
        return {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in result.items()}

    return _common.save(args, "bf16_state", fig, {
        "blr": {"results": {arm: plain(r) for arm, r in results.items()},
                "paired": blr_record["paired"], "predicted": blr_record["predicted"]},
        "lm": {"data": lm_record["data"], "runs": lm_record["runs"]}, "table": report},
        dpi=100, compact=True)


if __name__ == "__main__":
    main()
