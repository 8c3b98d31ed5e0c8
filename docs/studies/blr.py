"""Study 1: does IVON learn the right posterior? Bayesian linear regression, where the answer is
known in closed form.

Model: y = X w + noise, noise ~ N(0, s^2) with s known, and IVON's conventions: the training loss
is the mean over the N examples of the per-example negative log-likelihood

    l_i(w) = 0.5 / s^2 * (y_i - x_i^T w)^2          (so its Hessian is x_i x_i^T / s^2)

ess = N, and weight_decay delta is the prior precision per unit of ess: the prior is
N(0, I / (N delta)). IVON then targets the posterior p(w | X, y), which is Gaussian:

    precision  P  = X^T X / s^2 + N delta I
    mean       mu = P^-1 X^T y / s^2

IVON's family is diagonal. The diagonal Gaussian q closest to p in KL(q || p) (IVON's variational
objective) has mean mu and precision diag(P): sigma_j = 1 / sqrt(P_jj). In IVON's terms
sigma_j = 1 / sqrt(N (h_j + delta)), so IVON's Hessian estimate should converge to
h_j = (X^T X)_jj / (N s^2), the mean of x_ij^2 / s^2. Note that sigma_j is *smaller* than the
exact marginal standard deviation sqrt((P^-1)_jj) when the features are correlated: that is what
any mean-field approximation learns, and it is what we compare against.

What is run, for a few seeds (each seed draws its own data and noise):
  * ivon_fast.IVON (the default Philox noise, the compiled CPU kernel), the official loop, full
    batch, mc_samples samples per step, cosine learning-rate decay to 0;
  * ivon-opt 0.1.3 (``ivon.IVON``) with the same hyperparameters;
  * once, ivon_fast with rng='torch' (reference backend) next to ivon-opt from the same torch seed:
    the two must agree bit for bit (the JSON records the largest difference, 0).
and, on seed 0, an ablation over beta2, mc_samples and the learning-rate schedule, which shows
what limits the accuracy of sigma: the Monte-Carlo noise of the 'price' Hessian estimate,
averaged by the beta2 moving average, and the time it takes that average to forget hess_init.

The predicted noise floor (the JSON's and table's "predicted"): each step's price estimate
f_j = eps_j g_j / sigma_j is unbiased for h_j with variance (2 H_jj^2 + sum_{k!=j} H_jk^2
sigma_k^2 / sigma_j^2) / K at the optimum (H = X^T X / (N s^2)); a beta2 moving average of
independent estimates has variance (1 - beta2) / (1 + beta2) times that, and sigma's relative
error is half h's. The start contributes (hess_init - h_j) beta2^T in expectation.

Run: ``python docs/studies/blr.py`` (about 2 minutes on 2 cores), ``--quick`` (< 30 s).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402


def make_problem(seed: int, d: int, n: int, noise_std: float, rho: float, weight_decay: float):
    """Data and the closed-form answer, in float64 from exactly the float32 data trained on.

    The features are correlated (corr(x_j, x_k) = rho^|j-k|) and scaled from 0.5 to 2, so the
    curvature h_j spans a factor ~16 and the mean-field sigma differs from the marginal std.
    """
    g = torch.Generator().manual_seed(seed)
    j = torch.arange(d, dtype=torch.float64)
    corr = rho ** (j[:, None] - j[None, :]).abs()
    scales = torch.logspace(math.log10(0.5), math.log10(2.0), d, dtype=torch.float64)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(corr).T)
    x = (x * scales).float()
    w_true = torch.randn(d, generator=g, dtype=torch.float64)
    y = (x.double() @ w_true + noise_std * torch.randn(n, generator=g, dtype=torch.float64)).float()

    X, Y = x.double(), y.double()
    precision = X.T @ X / noise_std ** 2 + n * weight_decay * torch.eye(d, dtype=torch.float64)
    mu = torch.linalg.solve(precision, X.T @ Y / noise_std ** 2)
    sigma_diag = precision.diagonal().rsqrt()                      # best diagonal q: KL(q || p)
    sigma_marginal = torch.linalg.inv(precision).diagonal().sqrt()  # exact marginals
    hess = X.T @ X / (n * noise_std ** 2)                           # NLL Hessian of the mean loss
    return dict(x=x, y=y, mu=mu, sigma=sigma_diag, sigma_marginal=sigma_marginal, hess=hess)


def predicted_sigma_error(problem, beta2: float, mc_samples: int, steps: int, hess_init: float,
                          weight_decay: float) -> float:
    """The RMS (over coordinates) relative error of sigma expected from the Hessian estimate's
    Monte-Carlo noise and from hess_init not yet forgotten (see the module docstring)."""
    H, sigma = problem["hess"], problem["sigma"]
    hjj = H.diagonal()
    ratio = (sigma[None, :] / sigma[:, None]) ** 2                 # sigma_k^2 / sigma_j^2
    var_f = 2 * hjj ** 2 + ((H ** 2) * ratio).sum(1) - hjj ** 2    # k != j terms plus 2 H_jj^2
    var_h = (1 - beta2) / (1 + beta2) * var_f / mc_samples
    expected_h = hjj + (hess_init - hjj) * beta2 ** steps
    bias = ((hjj + weight_decay) / (expected_h + weight_decay)).sqrt() - 1   # sigma's, exactly
    rel_sigma_sq = bias ** 2 + 0.25 * var_h / (expected_h + weight_decay) ** 2
    return float(rel_sigma_sq.mean().sqrt())


def errors(mean, sigma, problem) -> dict:
    """How far a learned (mean, sigma) is from the closed form."""
    mu, sig = problem["mu"], problem["sigma"]
    mean, sigma = mean.double().flatten(), sigma.double().flatten()
    rel = sigma / sig - 1
    z = (mean - mu) / sig          # the mean's error in units of the exact posterior std
    return {"mean_err_rms_sigma": float(z.pow(2).mean().sqrt()),
            "mean_err_max_sigma": float(z.abs().max()),
            "mean_rel_err": float((mean - mu).norm() / mu.norm()),
            "sigma_rel_err_rms": float(rel.pow(2).mean().sqrt()),
            "sigma_rel_err_max": float(rel.abs().max()),
            "sigma_bias": float(rel.mean())}


ERROR_KEYS = ("mean_err_rms_sigma", "mean_err_max_sigma", "mean_rel_err", "sigma_rel_err_rms",
              "sigma_rel_err_max", "sigma_bias")


def posterior_of(opt, model) -> tuple:
    """(mean, sigma) of either implementation, both with sigma = 1 / sqrt(ess (h + delta))."""
    import ivon_fast
    if isinstance(opt, ivon_fast.IVON):
        post = opt.posterior()
        return post.mean[0], post.std[0]
    group = opt.param_groups[0]   # ivon-opt: the params hold the mean, the group a flat hess
    std = 1.0 / (group["ess"] * (group["hess"] + group["weight_decay"])).sqrt()
    return model.weight.detach().clone(), std


def train(impl: str, problem, *, steps, mc_samples, lr, hess_init, beta2, weight_decay,
          noise_std, seed, cosine=True, log_every=100):
    """Full-batch IVON in the official loop; returns (mean, sigma, trajectory, seconds)."""
    import ivon
    import ivon_fast

    x, y = problem["x"], problem["y"]
    n, d = x.shape
    model = torch.nn.Linear(d, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()   # the same start for every implementation
    options = dict(lr=lr, ess=float(n), hess_init=hess_init, beta2=beta2,
                   weight_decay=weight_decay, mc_samples=mc_samples)
    if impl == "ivon-opt":
        torch.manual_seed(seed)          # ivon-opt draws its noise from torch's global generator
        opt = ivon.IVON(model.parameters(), **options)
    elif impl == "ivon_fast rng=torch":  # draws exactly as ivon-opt: same seed, same numbers
        torch.manual_seed(seed)
        opt = ivon_fast.IVON(model.parameters(), backend="reference", rng="torch", **options)
    else:
        opt = ivon_fast.IVON(model.parameters(), seed=seed, **options)

    trajectory = []
    with _common.Timer() as timer:
        for t in range(steps):
            # a decaying lr lets the mean settle: each step moves it by lr times sampled noise
            for group in opt.param_groups:
                group["lr"] = _common.cosine(lr, t, steps) if cosine else lr
            for _ in range(mc_samples):
                with opt.sampled_params(train=True):
                    opt.zero_grad()
                    loss = 0.5 / noise_std ** 2 * (model(x).squeeze(1) - y).pow(2).mean()
                    loss.backward()
            opt.step()
            if (t + 1) % log_every == 0 or t + 1 == steps:
                mean, sigma = posterior_of(opt, model)
                trajectory.append({"step": t + 1, **errors(mean, sigma, problem)})
    mean, sigma = posterior_of(opt, model)
    return mean.flatten(), sigma.flatten(), trajectory, timer.seconds


def main(argv=None):
    p = _common.parser(__doc__)
    p.add_argument("--d", type=int, default=16, help="number of weights")
    p.add_argument("--n", type=int, default=1000, help="number of examples (= ess)")
    p.add_argument("--noise-std", type=float, default=0.5, help="s, the known noise std")
    p.add_argument("--rho", type=float, default=0.7, help="feature correlation rho^|j-k|")
    p.add_argument("--weight-decay", type=float, default=0.01,
                   help="delta: prior precision per unit of ess (prior N(0, 1/(n delta)))")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--mc-samples", type=int, default=4)
    p.add_argument("--lr", type=float, default=0.1,
                   help="0.1: larger rates make the early Hessian estimates (taken while the "
                        "mean is far off) overshoot, which beta2 then takes long to forget")
    p.add_argument("--hess-init", type=float, default=1.0)
    p.add_argument("--beta2", type=float, default=0.999,
                   help="not the paper's 0.99999: the Hessian average must forget hess_init "
                        "within the run (see the ablation)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--no-ablation", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.mc_samples, args.beta2, args.seeds = 1500, 2, 0.995, 1
        args.no_ablation = True
    _common.setup(args)
    import matplotlib.pyplot as plt

    hyper = dict(steps=args.steps, mc_samples=args.mc_samples, lr=args.lr,
                 hess_init=args.hess_init, beta2=args.beta2, weight_decay=args.weight_decay,
                 noise_std=args.noise_std)
    problems = [make_problem(seed, args.d, args.n, args.noise_std, args.rho, args.weight_decay)
                for seed in range(args.seeds)]
    runs = []   # one row per (implementation, seed)
    for seed, problem in enumerate(problems):
        for impl in ("ivon_fast", "ivon-opt"):
            mean, sigma, trajectory, seconds = train(impl, problem, seed=seed, **hyper)
            runs.append({"impl": impl, "seed": seed, "seconds": seconds,
                         **errors(mean, sigma, problem), "trajectory": trajectory,
                         "mean": mean.tolist(), "sigma": sigma.tolist()})
            print(f"seed {seed} {impl:9s} {seconds:5.1f}s  sigma rel err rms "
                  f"{runs[-1]['sigma_rel_err_rms']:.4f}  mean err rms "
                  f"{runs[-1]['mean_err_rms_sigma']:.4f} sigma", flush=True)

    # ivon_fast with rng='torch' draws its noise as ivon-opt does: the same run, bit for bit.
    # (A short run: the point is equality, which either holds at every step or breaks early.)
    short = dict(hyper, steps=min(args.steps, 300))
    same = [train(impl, problems[0], seed=0, **short) for impl in ("ivon-opt", "ivon_fast rng=torch")]
    bitwise = {"steps": short["steps"],
               "max_abs_diff_mean": float((same[0][0] - same[1][0]).abs().max()),
               "max_abs_diff_sigma": float((same[0][1] - same[1][1]).abs().max()),
               "equal": bool(torch.equal(same[0][0], same[1][0])
                             and torch.equal(same[0][1], same[1][1]))}
    print(f"ivon_fast rng='torch' vs ivon-opt, {short['steps']} steps: bitwise equal = "
          f"{bitwise['equal']}", flush=True)

    # what limits sigma's accuracy: beta2 (averaging length vs forgetting hess_init), samples,
    # and the lr schedule (the mean), on seed 0 with ivon_fast
    ablation = []
    if not args.no_ablation:
        variants = [("main", {}), ("beta2=0.99", dict(beta2=0.99)),
                    ("beta2=0.9999", dict(beta2=0.9999)),
                    ("beta2=0.99999 (paper default)", dict(beta2=0.99999)),
                    ("mc_samples=1", dict(mc_samples=1)), ("constant lr", dict(cosine=False)),
                    ("lr=0.5", dict(lr=0.5))]
        for name, change in variants:
            if name == "main":
                run = next(r for r in runs if r["impl"] == "ivon_fast" and r["seed"] == 0)
                trajectory, seconds = run["trajectory"], run["seconds"]
                result = {key: run[key] for key in ERROR_KEYS}
            else:
                mean, sigma, trajectory, seconds = train("ivon_fast", problems[0], seed=0,
                                                         **dict(hyper, **change))
                result = errors(mean, sigma, problems[0])
            config = dict(hyper, **change)
            ablation.append({"variant": name, "seconds": seconds, **result,
                             "predicted_sigma_rel_err_rms": predicted_sigma_error(
                                 problems[0], config["beta2"], config["mc_samples"],
                                 config["steps"], config["hess_init"], config["weight_decay"]),
                             "trajectory": trajectory})
            print(f"ablation {name:30s} sigma rel err rms {result['sigma_rel_err_rms']:.4f}",
                  flush=True)

    # ---- tables
    rows = []
    for impl in ("ivon_fast", "ivon-opt"):
        mine = [r for r in runs if r["impl"] == impl]
        col = lambda key: [r[key] for r in mine]  # noqa: E731
        rows.append([impl, len(mine), _common.pm(col("mean_err_rms_sigma"), 4),
                     _common.pm(col("mean_rel_err"), 5), _common.pm(col("sigma_rel_err_rms"), 4),
                     _common.pm(col("sigma_rel_err_max"), 4), _common.pm(col("sigma_bias"), 4),
                     _common.pm(col("seconds"), 1)])
    predicted = [predicted_sigma_error(pr, args.beta2, args.mc_samples, args.steps,
                                       args.hess_init, args.weight_decay) for pr in problems]
    table = _common.markdown_table(
        ["implementation", "seeds", "mean error, RMS (in exact sigma)", "‖m − μ‖/‖μ‖",
         "sigma rel. error, RMS", "sigma rel. error, max", "sigma bias (mean rel.)", "seconds"],
        rows)
    ratio = torch.cat([pr["sigma_marginal"] / pr["sigma"] for pr in problems])
    lines = [table, "",
             f"Predicted sigma rel. error, RMS (Monte-Carlo noise of the Hessian estimate and "
             f"hess_init's residue): {_common.pm(predicted, 4)}.",
             f"ivon_fast rng='torch' vs ivon-opt ({bitwise['steps']} steps, seed 0): bitwise "
             f"equal = {bitwise['equal']} (max |diff|: mean {bitwise['max_abs_diff_mean']:.3g}, "
             f"sigma {bitwise['max_abs_diff_sigma']:.3g}).",
             f"Exact marginal std / mean-field sigma: median {ratio.median():.2f}, range "
             f"{ratio.min():.2f}..{ratio.max():.2f} (the price of a diagonal posterior, not of "
             "IVON)."]
    if ablation:
        lines += ["", _common.markdown_table(
            ["variant (ivon_fast, seed 0)", "sigma rel. error, RMS", "predicted", "sigma bias",
             "mean error, RMS (in sigma)", "seconds"],
            [[a["variant"], f"{a['sigma_rel_err_rms']:.4f}",
              f"{a['predicted_sigma_rel_err_rms']:.4f}", f"{a['sigma_bias']:+.4f}",
              f"{a['mean_err_rms_sigma']:.4f}", f"{a['seconds']:.1f}"] for a in ablation])]
    report = "\n".join(lines)
    print()
    print(f"Bayesian linear regression: d={args.d}, N={args.n}, s={args.noise_std}, "
          f"rho={args.rho}, delta={args.weight_decay}; {args.steps} full-batch steps, "
          f"mc_samples={args.mc_samples}, lr={args.lr} (cosine to 0), hess_init={args.hess_init}, "
          f"beta2={args.beta2}")
    print()
    print(report)

    # ---- figure: mean vs exact, sigma vs exact, and sigma's error over training
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    markers = {"ivon_fast": ("o", "C0"), "ivon-opt": ("x", "C1")}
    for r in runs:
        marker, color = markers[r["impl"]]
        pr = problems[r["seed"]]
        label = r["impl"] if r["seed"] == 0 else None
        axes[0].scatter(pr["mu"], r["mean"], marker=marker, color=color, s=22, label=label)
        axes[1].scatter(pr["sigma"], r["sigma"], marker=marker, color=color, s=22, label=label)
    for k, pr in enumerate(problems):
        axes[1].scatter(pr["sigma"], pr["sigma_marginal"], marker=".", color="0.6", s=14,
                        label="exact marginal std" if k == 0 else None)
    for ax, title in ((axes[0], "posterior mean"), (axes[1], "posterior std (sigma)")):
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8, zorder=0)
        ax.set_xlabel(f"closed form ({title})")
        ax.set_ylabel("learned")
        ax.legend(fontsize=8)
    axes[0].set_title("mean: IVON vs closed form")
    axes[1].set_title("sigma: IVON vs best diagonal Gaussian")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    series = ablation or [{"variant": "main", "trajectory": runs[0]["trajectory"],
                           "predicted_sigma_rel_err_rms": predicted[0]}]
    for k, a in reversed(list(enumerate(series))):   # the main run drawn last, on top
        steps = [point["step"] for point in a["trajectory"]]
        err = [point["sigma_rel_err_rms"] for point in a["trajectory"]]
        color, width = ("k", 2.0) if a["variant"] == "main" else (f"C{k}", 1.0)
        axes[2].plot(steps, err, color=color, lw=width, label=a["variant"])
        axes[2].axhline(a["predicted_sigma_rel_err_rms"], color=color, ls=":", lw=0.8)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("sigma rel. error, RMS over weights")
    axes[2].set_title("sigma's error during training\n(dotted: predicted at the last step)")
    handles, labels = axes[2].get_legend_handles_labels()
    axes[2].legend(handles[::-1], labels[::-1], fontsize=7)   # in the table's order
    fig.tight_layout()
    return _common.save(args, "blr", fig, {
        "runs": runs, "bitwise": bitwise, "predicted_sigma_rel_err_rms": predicted,
        "ablation": ablation, "marginal_over_diagonal_sigma": ratio.tolist(), "table": report},
        compact=True)


if __name__ == "__main__":
    main()
