"""The studies of docs/studies run end to end (``--quick``, into a temporary folder) and their
numbers are sane; the Bayesian-linear-regression study also checks IVON against the closed form.

The quick runs are smoke tests: fewer seeds, steps and epochs than the evidence in
docs/EVIDENCE.md, so their numbers are only checked for sanity, except where stated.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = os.path.join(REPO, "docs", "studies")


def _run(script: str, out) -> dict:
    result = subprocess.run(
        [sys.executable, os.path.join(STUDIES, script), "--quick", "--out", str(out)], cwd=REPO,
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    name = script[:-3]
    assert (out / f"{name}.png").stat().st_size > 10_000
    record = json.load(open(out / f"{name}.json"))
    assert record["table"].startswith("|") and record["table"] in result.stdout
    return record


def _import_blr():
    sys.path.insert(0, STUDIES)
    try:
        import blr
    finally:
        sys.path.remove(STUDIES)
    return blr


def test_blr_closed_form_is_the_optimum():
    """The study's ground truth: mu is the stationary point of IVON's objective (mean NLL plus
    delta/2 |w|^2, i.e. the prior N(0, 1/(N delta)) per unit of ess), and 1/sqrt(diag P) is the
    diagonal Gaussian closest to N(mu, P^-1) in KL(q || p), found here by direct minimization."""
    blr = _import_blr()
    n, d, s, delta = 300, 6, 0.5, 0.01
    problem = blr.make_problem(0, d, n, s, 0.7, delta)
    x, y = problem["x"].double(), problem["y"].double()
    w = problem["mu"].clone().requires_grad_(True)
    objective = 0.5 / s ** 2 * (x @ w - y).pow(2).mean() + 0.5 * delta * w.pow(2).sum()
    (grad,) = torch.autograd.grad(objective, w)
    assert grad.abs().max() < 1e-10

    precision = x.T @ x / s ** 2 + n * delta * torch.eye(d, dtype=torch.float64)
    log_std = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_std], max_iter=500, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def kl():  # KL(N(mu, diag(exp(2 log_std))) || N(mu, P^-1)) up to a constant
        opt.zero_grad()
        value = 0.5 * (precision.diagonal() * (2 * log_std).exp()).sum() - log_std.sum()
        value.backward()
        return value

    opt.step(kl)
    torch.testing.assert_close(log_std.detach().exp(), problem["sigma"], rtol=1e-6, atol=0)
    # mean field is narrower than the exact marginals when features correlate
    assert (problem["sigma_marginal"] > problem["sigma"]).all()


def test_blr_quick_matches_the_closed_form(tmp_path):
    """IVON's learned mean and sigma against the closed form (quick run: 1500 full-batch steps,
    2 MC samples, beta2 0.995; its predicted RMS error of sigma is 0.034).

    Tolerances: sigma within 8% RMS and 20% at worst over the 16 weights; the mean within 0.15
    posterior standard deviations RMS and 1% in norm. Both implementations; and ivon_fast with
    rng='torch' equals ivon-opt bit for bit."""
    record = _run("blr.py", tmp_path)
    assert record["bitwise"]["equal"] is True
    assert {run["impl"] for run in record["runs"]} == {"ivon_fast", "ivon-opt"}
    for run in record["runs"]:
        assert run["sigma_rel_err_rms"] < 0.08, run["impl"]
        assert run["sigma_rel_err_max"] < 0.20, run["impl"]
        assert run["mean_err_rms_sigma"] < 0.15, run["impl"]
        assert run["mean_rel_err"] < 0.01, run["impl"]
        assert len(run["sigma"]) == record["args"]["d"]
    predicted = record["predicted_sigma_rel_err_rms"][0]
    assert 0.01 < predicted < 0.08


def _finite_metrics(row):
    assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and 0 <= row["brier"] <= 2
    assert 0 < row["nll"] < 10 and all(math.isfinite(row[k]) for k in ("nll", "ece", "brier"))


def test_calibration_quick(tmp_path):
    record = _run("calibration.py", tmp_path)
    results = record["results"]
    methods = {r["method"] for r in results}
    assert methods == {"AdamW", "AdamW + temp. scaling", "IVON mean", "IVON K=4"}
    assert {r["noise"] for r in results} == {0.0, 0.3}
    for row in results:
        _finite_metrics(row)
        if row["noise"] == 0:
            assert row["accuracy_clean"] == row["accuracy"]
            assert row["accuracy"] > 0.7, row   # 10 classes, 8 epochs: far above chance
        else:   # labels 30% wrong: the noisy-label accuracy is capped near 0.7
            assert row["accuracy"] < row["accuracy_clean"]
            assert row["accuracy_clean"] > 0.6, row
        if row["temperature"] is not None:
            assert 0.05 < row["temperature"] < 20
    for method in methods:
        for line in record["table"].splitlines():
            if f"| {method} |" in line:
                break
        else:
            pytest.fail(f"{method} missing from the table")


def test_ood_quick(tmp_path):
    record = _run("ood.py", tmp_path)
    results = record["results"]
    assert {r["method"] for r in results} == {"AdamW", "IVON mean", "IVON K=4"}
    for row in results:
        assert row["accuracy"] > 0.8, row   # 5 classes, 10 epochs
        for key, value in row.items():
            if key.startswith("auroc"):
                assert 0 <= value <= 1
        # unseen digits are more uncertain than seen ones, for every method
        assert row["auroc_entropy digits 5-9"] > 0.6, row
    assert all("auroc_mi digits 5-9" in r for r in results if r["method"] == "IVON K=4")


def test_bf16_state_quick_learns_the_same_posterior(tmp_path):
    """bf16 optimizer state (stochastic rounding) against float32 state, on the closed-form BLR
    (quick run: 4 data sets x 5 noise seeds = 20 runs, 1500 full-batch steps, 1 MC sample,
    beta2 0.995, hess_init 16; float32's predicted RMS error of sigma is 0.048, and bf16's
    rounding adds 0.011 in quadrature), and a smoke run of the language-model part.

    Expectations, on the 20 runs of each arm (the same data and Philox noise in both: only the
    rounding differs):
    - both reach the closed form in every run within blr's quick tolerances: sigma within 10% RMS
      and 20% at worst, the mean within 0.15 exact posterior stds RMS and 1% in norm;
    - bf16's average sigma error is at most 1.25x float32's and within 30% of its predicted floor;
    - no bias: bf16's average sigma bias and mean error differ from float32's by less than 3
      standard errors of that difference, computed from the seed-to-seed spread; paired run by
      run, the average sigma bias differs by under 0.5%;
    - paired run by run, bf16's sigma differs from float32's by the predicted rounding noise
      (within 30%), under half as much as two float32 runs with different noise differ, and its
      mean by under a fifth of theirs."""
    record = _run("bf16_state.py", tmp_path)
    blr_results, paired = record["blr"]["results"], record["blr"]["paired"]
    assert set(blr_results) == {"fp32", "bf16"}
    mean = lambda values: sum(values) / len(values)  # noqa: E731
    runs = {arm: blr_results[arm]["runs"] for arm in blr_results}
    assert len(runs["fp32"]) == len(runs["bf16"]) == 20
    for arm, arm_runs in runs.items():
        for run in arm_runs:
            assert run["sigma_rel_err_rms"] < 0.10, (arm, run)
            assert run["sigma_rel_err_max"] < 0.20, (arm, run)
            assert run["mean_err_rms_sigma"] < 0.15, (arm, run)
            assert run["mean_rel_err"] < 0.01, (arm, run)
    col = lambda arm, key: [run[key] for run in runs[arm]]  # noqa: E731
    fp32_err = mean(col("fp32", "sigma_rel_err_rms"))
    bf16_err = mean(col("bf16", "sigma_rel_err_rms"))
    assert bf16_err <= 1.25 * fp32_err
    predicted = mean(record["blr"]["predicted"]["bf16"])
    assert 0.7 * predicted < bf16_err < 1.3 * predicted
    for key in ("sigma_bias", "mean_err_rms_sigma", "sigma_rel_err_rms"):
        a, b = col("bf16", key), col("fp32", key)
        spread = math.sqrt((torch.tensor(a).var() + torch.tensor(b).var()) / len(a))
        assert abs(mean(a) - mean(b)) < 3 * spread, key
    assert abs(mean([a - b for a, b in zip(col("bf16", "sigma_bias"),
                                           col("fp32", "sigma_bias"))])) < 0.005
    rounding = mean(paired["bf16"]["sigma_rel_diff_rms"])
    assert 0.7 * mean(record["blr"]["predicted"]["rounding"]) < rounding
    assert rounding < 1.3 * mean(record["blr"]["predicted"]["rounding"])
    assert rounding < 0.5 * mean(paired["fp32, other noise"]["sigma_rel_diff_rms"])
    assert (mean(paired["bf16"]["mean_diff_rms_sigma"])
            < 0.2 * mean(paired["fp32, other noise"]["mean_diff_rms_sigma"]))

    # the language model: a 60-step smoke run; after so few steps bf16 state is still on
    # float32's trajectory, while round-to-nearest has lost some of h's decay from hess_init
    lm = {run["arm"]: run for run in record["lm"]["runs"]}
    assert set(lm) == {"fp32", "bf16", "bf16 round-to-nearest"}
    assert lm["bf16 round-to-nearest"]["backend"] == "reference, rounding to nearest"
    for run in lm.values():
        assert 0 < run["val_loss_mean"] < math.log(record["lm"]["data"]["vocab"]) + 0.5, run
        assert math.isfinite(run["val_loss_predictive"]) and math.isfinite(run["train_loss_mean"])
    assert abs(lm["bf16"]["val_loss_mean"] - lm["fp32"]["val_loss_mean"]) < 0.01
    fp32_h = lm["fp32"]["hess_quantiles"][1]
    assert abs(lm["bf16"]["hess_quantiles"][1] - fp32_h) < 0.01 * fp32_h
    assert lm["bf16 round-to-nearest"]["hess_quantiles"][1] > fp32_h + 0.03
