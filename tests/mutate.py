"""Mutation check: deliberate bugs that the test suite must catch.

Usage (from anywhere; the repository is the parent of this file's folder):

    python tests/mutate.py                  # run every mutation
    python tests/mutate.py --only NAME ...  # run the named mutations
    python tests/mutate.py --list           # list the mutations

Each mutation is one row of ``MUTATIONS``: a name, a file, an exact piece of its text, the text
that replaces it, and the pytest arguments of the tests that must catch it. For each mutation the
script

1. copies the repository into a temporary folder (tracked files and untracked ones git does not
   ignore: ``git ls-files -co --exclude-standard``),
2. replaces the text; it must occur exactly once, so that a refactor which moves or rewrites the
   code fails loudly here instead of silently disabling the mutation,
3. rebuilds the extension in the copy when the file is under csrc/ (CPU kernels only, to save
   time; so not for a CUDA source or header, csrc/*.cu and csrc/*.cuh), else copies the built ``ivon_fast/_C*.so`` (and
   ``_build_info.py``) in; and links the test build of the CUDA source on the CPU
   (build/cuda_on_cpu/, tests/cuda_on_cpu_build.py) in, which recompiles what the mutation
   changed when a test loads it,
4. runs pytest with the row's arguments in the copy, with the copy first on PYTHONPATH (the
   repository is installed in editable mode; the script checks that the copy's ``ivon_fast``, and
   its compiled extension, are the ones imported).

A mutation is KILLED when pytest fails and SURVIVED when it passes. Before the mutations, every
distinct set of pytest arguments runs once on an unmutated copy: a test that fails anyway would
"kill" every mutation and prove nothing.

Exit status: 0 when every mutation was killed, 1 when one survived, 2 when the check itself could
not run (text not found exactly once, a build or the baseline failed, the wrong package imported).

To add a mutation, append a ``Mutation`` to ``MUTATIONS``; keep its pytest arguments narrow (the
tests that should catch it, with ``-k``) so the run stays short.
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SetupError(Exception):
    """The mutation check itself could not run."""


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str           # relative to the repository root
    old: str            # must occur exactly once in the file
    new: str
    pytest_args: tuple  # the tests that must fail


TRITON = "ivon_fast/triton_backend.py"
REFERENCE = "ivon_fast/reference.py"
MATH = "csrc/ivon_math.h"
OPTIMIZER = "ivon_fast/optimizer.py"
LAYOUT = "ivon_fast/_layout.py"
USER_PATHS = "tests/test_user_paths.py"
SHARDED = "ivon_fast/_sharded.py"
FSDP = "tests/test_fsdp.py"
AMP = "tests/test_amp.py"
FAULTS = "tests/test_faults.py"
SCALARS = "ivon_fast/scalars.py"
CONTRACT = "ivon_fast/_contract.py"
CONTRACT_TESTS = "tests/test_contract.py"
BUCKET = "ivon_fast/_bucket.py"
OP_LOOP = "ivon_fast/_op_loop.py"
DRAWS = "ivon_fast/_draws.py"
GROUPS = "ivon_fast/_groups.py"
USER_WRITES = "ivon_fast/_user_writes.py"
STEP = "ivon_fast/_step.py"
WRAPPERS = "ivon_fast/_wrappers.py"
CHECKPOINT = "ivon_fast/_checkpoint.py"
CUDA = "csrc/cuda_kernels.cuh"
# the CUDA source run on the CPU under the sanitizers (tests/test_cuda_on_cpu.py): the shared
# kernel suite and the grids and misaligned buffers of tests/cuda_on_cpu_suite.py
CUDA_ON_CPU = ("tests/test_cuda_on_cpu.py", "-k", "kernel_suite")

MUTATIONS = [
    # ---- rounding of bf16 / fp16 params ----
    Mutation("triton-bf16-truncates", TRITON,
             "    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16\n",
             "    rounded = bits >> 16\n",
             ("tests/test_kernels_state.py", "-k", "round_to_nearest_even and triton")),
    Mutation("triton-fp16-truncates", TRITON,
             "        value = value.to(ptr.dtype.element_ty)\n",
             "        value = value.to(ptr.dtype.element_ty, fp_downcast_rounding=\"rtz\")\n",
             ("tests/test_kernels_state.py", "-k", "round_to_nearest_even and triton")),
    Mutation("cpp-bf16-truncates", MATH,
             "  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;\n",
             "  const uint32_t rounded = u >> 16;\n",
             ("tests/test_kernels_state.py", "tests/test_kernels_builds.py", "-k", "nearest_even and cpu")),
    Mutation("cpp-fp16-truncates", MATH,
             "  const uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;",
             "  const uint32_t normal = (a + 0xc8000000u) >> 13;",
             ("tests/test_kernels_state.py", "tests/test_kernels_builds.py", "-k", "nearest_even and cpu")),
    # ---- the high 32 bits of the noise counter i >> 2 ----
    Mutation("avx512-avx2-counter-high-bits-dropped", "csrc/cpu_kernels.h",
             "    c1[v] = P::hi(q);\n",
             "    c1[v] = P::set1(0);\n",
             ("tests/test_kernels_builds.py", "-k", "whole_noise_counter")),
    Mutation("generic-cuda-counter-high-bits-dropped", MATH,
             "philox4x32_10(uint32_t(quad), uint32_t(quad >> 32), uint32_t(draw),\n"
             "                                        uint32_t(draw >> 32), uint32_t(seed),",
             "philox4x32_10(uint32_t(quad), 0u, uint32_t(draw),\n"
             "                                        uint32_t(draw >> 32), uint32_t(seed),",
             ("tests/test_kernels_builds.py", "-k", "whole_noise_counter")),
    Mutation("triton-counter-high-bits-dropped", TRITON,
             "c0, c1 = quad.to(tl.uint32), (quad >> 32).to(tl.uint32)\n",
             "c0, c1 = quad.to(tl.uint32), (quad * 0).to(tl.uint32)\n",
             ("tests/test_kernels.py", "-k", "noise_matches_reference and triton")),
    Mutation("triton-philox-high-and-low-words-swapped", TRITON,
             "return tl.math.umulhi(x, m), tl.mul(x, m, sanitize_overflow=False)",
             "return tl.mul(x, m, sanitize_overflow=False), tl.math.umulhi(x, m)",
             ("tests/test_kernels_builds.py", "-k", "philox_known_answers")),
    # ---- the update math ----
    Mutation("reference-momentum-weight-of-beta2", REFERENCE,
             "s.beta1 * momentum + s.one_minus_beta1 * grad_mean",
             "s.beta1 * momentum + s.one_minus_beta2 * grad_mean",
             ("tests/test_reference.py",)),
    Mutation("reference-debias-ignored", REFERENCE,
             "(new_momentum / debias + prior_term)",
             "(new_momentum + prior_term)",
             ("tests/test_reference.py",)),
    Mutation("triton-hess-correction-dropped", TRITON,
             "tl.div_rn(hess_coef * (diff * diff), hess + delta)",
             "tl.div_rn(0.0 * (diff * diff), hess + delta)",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton")),
    Mutation("triton-momentum-weight-of-beta2", TRITON,
             "momentum = beta1 * momentum + one_minus_beta1 * grad_mean",
             "momentum = beta1 * momentum + one_minus_beta2 * grad_mean",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton")),
    # ---- launch options and flag dispatch ----
    Mutation("triton-fp-contraction-on", TRITON,
             "num_warps=warps, enable_fp_fusion=False)",
             "num_warps=warps)",
             ("tests/test_kernels_builds.py", "-k", "contraction or fma")),
    Mutation("cpp-dispatch-ignores-first-sample", "csrc/dispatch_flags.h",
             "with_bool(a.first, [&](auto first) {",
             "with_bool(false, [&](auto first) {",
             ("tests/test_kernels.py", "-k", "accumulate and cpu")),
    # ---- the optimizer: noise streams, sync, and the paths users take ----
    Mutation("eval-draws-collide-with-training-draws", DRAWS,
             '        draw = EVAL_DRAW_BASE + self.next_eval\n',
             '        draw = self.next_eval\n',
             (USER_PATHS, "-k", "evaluation_noise")),
    Mutation("sync-average-not-divided-by-world-size", OP_LOOP,
             '            average.div_(world_size)\n',
             '            pass\n',
             ("tests/test_distributed.py", "-k", "averages_ranks")),
    Mutation("sync-ranks-share-one-noise-key", "ivon_fast/noise.py",
             "return rank_seed(self.seed, _rank(self.sync))",
             "return self.seed",
             ("tests/test_distributed.py", "-k", "distinct_noise")),
    Mutation("pending-sample-not-folded-at-block-exit", "ivon_fast/_blocks.py",
             "        if not opt._accumulating and opt._count + 1 < opt.mc_samples:\n",
             "        if False:\n",
             (USER_PATHS, "-k", "clearing_grads")),
    Mutation("zero-grad-drops-the-pending-sample", OPTIMIZER,
             "                self._fold_pending()\n        self._layout.zero_grads()",
             "                pass\n        self._layout.zero_grads()",
             (USER_PATHS, "-k", "zero_grad_between_blocks")),
    Mutation("model-checkpoint-after-load-becomes-the-mean", USER_WRITES,
             '    if not from_checkpoint:\n        for bucket, index in written:',
             '    if True:\n        for bucket, index in written:',
             (USER_PATHS, "-k", "resume")),
    Mutation("moved-params-not-followed", LAYOUT,
             '        if not any(bucket.moved() for bucket in self.buckets):\n            return False\n',
             '        return False\n',
             (USER_PATHS, "-k", "model_to or model_half")),
    Mutation("rebound-grad-view-trusted", BUCKET,
             '        return (self.params[index].grad is view\n                and view.data_ptr()',
             '        return (self.params[index].grad is view\n                or view.data_ptr()',
             (USER_PATHS, "-k", "to_empty")),
    Mutation("channels-last-strides-dropped", BUCKET,
             '    return tuple(tensor.stride())\n',
             '    return contiguous\n',
             (USER_PATHS, "-k", "channels_last")),
    Mutation("writes-in-mean-params-discarded", OPTIMIZER,
             '            _user_writes.prepare(self, params_hold_mean=True)\n',
             '            self._layout.forget_writes()\n',
             (USER_PATHS, "-k", "inside_mean_params")),
    Mutation("compiled-step-traced-by-dynamo", WRAPPERS,
             '        return torch.compiler.disable(function, reason=_EAGER_REASON)\n',
             '        return function\n',
             (USER_PATHS, "-k", "compile")),
    Mutation("do-nothing-closure-takes-a-sample", STEP,
             'return loss, loss is not None or opt._layout.grad_versions() != before',
             'return loss, True',
             (USER_PATHS, "-k", "do_nothing_closure")),
    Mutation("writes-adopted-whole-not-by-element", USER_WRITES,
             'mean.copy_(torch.where(current != expected, current.to(mean.dtype), mean))',
             'mean.copy_(current.to(mean.dtype))',
             (USER_PATHS, "-k", "changes_nothing")),
    Mutation("pending-noise-rescaled-by-new-hyperparameters", OP_LOOP,
             '        if draw is not None and draw < EVAL_DRAW_BASE and bucket.group_index < len(self._values):\n',
             '        if False:\n',
             (USER_PATHS, "-k", "noise_scalars")),
    Mutation("unfrozen-param-loses-its-first-gradient", BUCKET,
             '                elif grad is not view:\n',
             '                elif False:\n',
             (USER_PATHS, "-k", "unfreezing")),
    # ---- update's device scalars (Note [device scalars of an update] in csrc/ivon_math.h) ----
    Mutation("skip-ignored-in-the-cpu-kernel", "csrc/cpu_kernels.h",
             "  if (d.skip) {\n"
             "    return skipped_update_range_t<PT, NEXT, RARE>(a, d.s, draws.next_draw, q_begin, q_end, rare);\n"
             "  }\n",
             "",
             ("tests/test_kernels.py", "-k", "skipped_step and cpu")),
    Mutation("found-inf-nan-and-negative-not-skipping", MATH,
             "if (a.found_inf != nullptr) d.skip = *a.found_inf != 0.0f;",
             "if (a.found_inf != nullptr) d.skip = *a.found_inf > 0.0f;",
             ("tests/test_kernels.py", "-k", "skipped_step and cpu")),
    Mutation("gradsq-average-unscaled-once", MATH,
             "    avg_term = unscaled<true, PRICE ? 1 : 2>(avg_term, s);\n",
             "    avg_term = unscaled<true, 1>(avg_term, s);\n",
             ("tests/test_kernels.py", "-k", "grad_scale and cpu")),
    Mutation("grad-scale-by-reciprocal-multiply", MATH,
             "    x = x / s.grad_scale;\n    if (TIMES == 2) x = x / s.grad_scale;\n",
             "    x = x * (1.0f / s.grad_scale);\n"
             "    if (TIMES == 2) x = x * (1.0f / s.grad_scale);\n",
             ("tests/test_kernels.py", "-k", "grad_scale and cpu")),
    Mutation("cpu-device-lr-ignored", MATH,
             "  if (a.device_lr != nullptr) d.s.lr = *a.device_lr;\n",
             "",
             ("tests/test_kernels.py", "-k", "device_lr and cpu")),
    Mutation("cpu-device-debias-ignored", MATH,
             "  if (a.device_debias != nullptr) d.s.debias = *a.device_debias;\n",
             "",
             ("tests/test_kernels.py", "-k", "device_lr and cpu")),
    Mutation("ops-device-scalar-device-unchecked", "csrc/ops.cpp",
             "  TORCH_CHECK(t->device() == param.device(), \"ivon_fast: \", name,",
             "  TORCH_CHECK(true, \"ivon_fast: \", name,",
             (CONTRACT_TESTS, "-k", "on_params_device")),
    Mutation("fake-kernel-device-scalars-unchecked", "ivon_fast/_fake_ops.py",
             "grad_scale=grad_scale, found_inf=found_inf, device_lr=device_lr,",
             "grad_scale=None, found_inf=None, device_lr=device_lr,",
             (CONTRACT_TESTS, "-k", "scalar")),
    Mutation("triton-found-inf-ignored", TRITON,
             "        if skip:  # uniform",
             "        if False:  # uniform",
             ("tests/test_kernels.py", "-k", "skipped_step and triton")),
    Mutation("triton-skipped-step-samples-the-draw", TRITON,
             "                          seed, next_draw, ess, weight_decay, RESAMPLE,",
             "                          seed, draw, ess, weight_decay, RESAMPLE,",
             ("tests/test_kernels.py", "-k", "skipped_step and triton")),
    Mutation("triton-skipped-step-keeps-the-old-param", TRITON,
             "        _store(param_ptr, k, inside, _load(mean_ptr, k, inside, 0.0, True), True)\n",
             "        pass\n",
             ("tests/test_kernels.py", "-k", "skipped_step and triton")),
    Mutation("triton-tile-length-in-int32", TRITON,
             "    tile, n = tl.cast(tile, tl.int64), tl.cast(n, tl.int64)",
             "    tile = tl.cast(tile, tl.int64)",
             ("tests/test_kernels_builds.py", "-k", "tiles_near_2_to_the_31")),
    Mutation("triton-interpreter-fma-rounds-twice", TRITON,
             "        bits = np.where((error != 0.0) & ((bits & 1) == 0), bits + nudge, bits)\n",
             "",
             ("tests/test_kernels_builds.py", "-k", "fma_rounds_once")),
    Mutation("triton-log-without-the-low-part-of-ln2", TRITON,
             "    tail = tl.fma(f2 * f, p, ef * 1.428606765330187e-06)\n",
             "    tail = tl.fma(f2 * f, p, ef * 0.0)\n",
             ("tests/test_kernels_builds.py", "-k", "bit_for_bit")),
    Mutation("triton-sincos-quadrant-sign", TRITON,
             "^ (((q + 1) & 2) << 30)",
             "^ ((q & 2) << 30)",
             ("tests/test_kernels_builds.py", "-k", "bit_for_bit")),
    Mutation("triton-tiles-of-a-program-overlap", TRITON,
             "    for tile in range(tl.program_id(0), tiles, tl.num_programs(0)):\n"
             "        k, quad, full, inside = _tile(tile, quad_base, n, BLOCK, LEAD, ORIGIN)\n"
             "        if skip:",
             "    for tile in range(tl.program_id(0), tiles, 1):\n"
             "        k, quad, full, inside = _tile(tile, quad_base, n, BLOCK, LEAD, ORIGIN)\n"
             "        if skip:",
             ("tests/test_kernels_builds.py", "-k", "bit_for_bit")),
    Mutation("triton-partial-last-tile-dropped", TRITON,
             "    tiles = triton.cdiv(n + lead, block)",
             "    tiles = (n + lead) // block",
             ("tests/test_kernels_builds.py", "-k", "bit_for_bit")),
    Mutation("triton-gradsq-average-unscaled-once", TRITON,
             "    if not PRICE:\n        avg_term = _unscaled(avg_term, scale, SCALED)\n",
             "    if False:\n        avg_term = _unscaled(avg_term, scale, SCALED)\n",
             ("tests/test_kernels.py", "-k", "grad_scale and triton")),
    Mutation("triton-grad-scale-by-reciprocal-multiply", TRITON,
             "        value = tl.div_rn(value, scale)\n",
             "        value = value * tl.div_rn(1.0, scale)\n",
             ("tests/test_kernels.py", "-k", "grad_scale and triton")),
    Mutation("triton-device-lr-ignored", TRITON,
             "        lr = tl.load(device_lr_ptr)\n",
             "        lr = lr\n",
             ("tests/test_kernels.py", "-k", "device_lr and triton")),
    Mutation("triton-device-debias-ignored", TRITON,
             "        debias = tl.load(device_debias_ptr)\n",
             "        debias = debias\n",
             ("tests/test_kernels.py", "-k", "device_lr and triton")),
    Mutation("beta1-of-one-accepted", "ivon_fast/_checks.py",
             '"beta1": (0.0, 1.0, False, True),',
             '"beta1": (0.0, 1.0, False, False),',
             (USER_PATHS, "-k", "divide_by_zero")),
    # ---- sharded params (FSDP2) ----
    Mutation("sharded-noise-offset-ignores-the-shard", SHARDED,
             "        offsets = [e.offset + _shard_start(e.param) for e in entries]\n",
             "        offsets = [e.offset for e in entries]\n",
             (FSDP, "-k", "noise_is_indexed")),
    Mutation("sharded-update-not-published", OP_LOOP,
             '    opt._layout.publish()\n    if next_draw is not None:\n',
             '    if next_draw is not None:\n',
             (FSDP, "-k", "equals_unsharded")),
    Mutation("sharded-grads-not-gathered", SHARDED,
             "            torch._foreach_copy_(targets, sources)\n",
             "            pass\n",
             (FSDP, "-k", "equals_unsharded")),
    Mutation("sharded-ranks-keep-their-own-seed", 'ivon_fast/noise.py',
             '    return common_seed(param_groups, seed)  # FSDP: one model, one key\n',
             '    return seed\n',
             (FSDP, "-k", "options")),
    Mutation("sharded-checkpoint-pending-grad-not-attached", SHARDED,
             '        """The param\'s gradient <- ``grad_flat``\'s part (a checkpoint\'s pending gradient)."""\n        from torch.distributed.tensor import DTensor\n',
             '        """The param\'s gradient <- ``grad_flat``\'s part (a checkpoint\'s pending gradient)."""\n        return\n',
             (FSDP, "-k", "round_trip")),
    Mutation("dcp-helpers-drop-the-counters", "ivon_fast/_checkpoint.py",
             '"params": [param_ids[id(p)] for p in group["params"]], _GROUP_KEY: dict(meta)}',
             '"params": [param_ids[id(p)] for p in group["params"]]}',
             (FSDP, "-k", "distributed_checkpoint")),
    Mutation("full-checkpoint-sliced-from-the-start", SHARDED,
             "        start = _shard_start(param)\n        return value",
             "        start = 0\n        return value",
             (FSDP, "-k", "unsharded_checkpoint")),
    # issue 8: mixed precision, non-finite gradients, the per-step check
    Mutation("nonfinite-grads-not-checked", OP_LOOP,
             '    check_grads = with_grad and scaler_found_inf is None\n',
             '    check_grads = False\n',
             (AMP, "-k", "skips_the_step_by_default and reference")),
    Mutation("scaler-folded-samples-not-checked", OP_LOOP,
             '(opt.skip_nonfinite or scaler_found_inf is not None)',
             'opt.skip_nonfinite',
             (FAULTS, "-k", "scaler")),
    Mutation("skipped-step-still-counted", SCALARS,
             "        self._taken.sub_(skipped)\n",
             "",
             (AMP, "-k", "reference")),
    Mutation("grad-scale-not-handed-to-the-kernels", OP_LOOP,
             '        inputs["grad_scale"] = to_device(grad_scale, device)\n',
             '        pass\n',
             (AMP, "-k", "scaled_training and reference")),
    Mutation("device-debias-one-step-ahead", SCALARS,
             "torch.pow(float(beta1), self._taken)",
             "torch.pow(float(beta1), self._taken + 1)",
             ("tests/test_ivon_opt_equivalence.py",)),
    Mutation("unscale-with-folded-samples-allowed", STEP,
             '        raise RuntimeError(UNSCALED_FOLDED_MESSAGE.format(count=opt._count))\n',
             '        pass\n',
             (AMP, "-k", "unscale_before_step")),
    Mutation("step-synchronizes-with-the-device", OP_LOOP,
             '    found_inf = torch.zeros(1, dtype=torch.float32, device=home)\n',
             '    found_inf = torch.zeros(1, dtype=torch.float32, device=home)\n    found_inf.add_(float(found_inf))\n',
             (AMP, "-k", "no_tensor_value_on_the_host")),
    Mutation("fsdp-ranks-skip-alone", OP_LOOP,
             '    _sharded.agree_on_skip(opt._layout.buckets, found_inf)\n',
             '',
             (FSDP, "-k", "nan_in_one")),
    Mutation("per-step-check-ignores-requires-grad", BUCKET,
             '            if (param._version != version or param.requires_grad != trainable\n',
             '            if (param._version != version\n',
             ("tests/test_optimizer.py", "tests/test_user_paths.py", "tests/test_faults.py",
              "-k", "frozen or freezing or unfreezing")),
    Mutation("per-step-check-ignores-rebinds", BUCKET,
             '                    or param.data_ptr() != param_ptr or param.shape != param_view.shape):',
             '                    or param.shape != param_view.shape):',
             ("tests/test_optimizer.py", "-k", "user_writes_become_the_mean")),
    Mutation("per-step-check-ignores-in-place-reshape", BUCKET,
             ' or param.shape != param_view.shape):',
             '):',
             (FAULTS, "-k", "reshaped_in_place")),
    Mutation("failed-fold-keeps-the-sample", "ivon_fast/_blocks.py",
             "            except BaseException:  # e.g. out of memory: the sample does not count\n"
             "                discard_sample(opt, kind, draw)\n",
             "            except BaseException:  # e.g. out of memory: the sample does not count\n",
             (FAULTS, "-k", "while_a_sample_is_folded")),
    Mutation("step-skips-the-range-recheck", STEP,
             '    for group in opt.param_groups:  # a value written into param_groups since the last step\n        check_group_hyperparameters(group, read_tensors=not opt.capturable)\n',
             '',
             (FAULTS, "-k", "out_of_range_after_construction")),
    # ---- capturable steps (tests/test_capturable.py) ----
    Mutation("cpu-kernels-ignore-device-draws", MATH,
             "  if (a.device_draws == nullptr) return {a.draw, a.next_draw, a.round_draw};\n",
             "  return {a.draw, a.next_draw, a.round_draw};\n",
             ("tests/test_capturable.py", "-k", "replace_the_host_draws and cpu")),
    Mutation("triton-next-draw-reads-the-draw", TRITON,
             "            next_draw = tl.load(device_draws_ptr + 1)\n",
             "            next_draw = tl.load(device_draws_ptr)\n",
             ("tests/test_capturable.py", "-k", "replace_the_host_draws and triton")),
    Mutation("capturable-passes-host-draws", DRAWS,
             '        return {"draw": 0, "device_draws": draws[:1]}\n',
             '        return {"draw": draw, "device_draws": draws[:1]}\n',
             ("tests/test_capturable.py", "-k", "replay_proxy and official")),
    Mutation("capturable-draws-not-advanced-by-step", OP_LOOP,
             '        opt._draws.advance_device()  # capturable: the next sample is now the pending one\n',
             '        pass\n',
             ("tests/test_capturable.py", "-k", "trains_exactly_like_eager and dropin")),
    Mutation("capturable-lr-on-the-host", OP_LOOP,
             '{**group, "lr": 0.0} if opt.capturable else group',
             'group',
             ("tests/test_capturable.py", "-k", "replay_proxy and dropin")),
    # the review of issue 8
    Mutation("scaler-attributes-left-after-a-failed-step", OPTIMIZER,
             '            self.__dict__.pop("grad_scale", None)\n',
             "",
             (AMP, "-k", "failed_step_inside_scaler_step")),
    Mutation("unscale-refused-without-folded-samples", STEP,
             '            and getattr(opt, "grad_scale", None) is None and opt._count > 0):\n',
             '            and getattr(opt, "grad_scale", None) is None and opt._count >= 0):\n',
             (AMP, "-k", "unscale")),
    Mutation("scaler-int-found-inf-not-a-tensor", OP_LOOP,
             'torch.as_tensor(scaler_found_inf, dtype=torch.float32)',
             'scaler_found_inf',
             (AMP, "-k", "without_any_gradient")),
    Mutation("finite-check-reads-frozen-gradients", OP_LOOP,
             '            for extreme in torch.aminmax(values[seg.slice]):\n',
             '            for extreme in torch.aminmax(values):\n',
             (AMP, "-k", "freezing_a_layer_after_a_nan")),
    Mutation("capturable-state-dict-holds-the-live-lr", "ivon_fast/_checkpoint.py",
             "(v.detach().clone() if isinstance(v, torch.Tensor) else v)",
             "v",
             ("tests/test_capturable.py", "-k", "lr_of_its_moment")),
    # issue 10 (first part): the posterior object, merging, wrappers
    Mutation("posterior-std-without-ess", "ivon_fast/posterior.py",
             "                std = 1.0 / (ess * (state[\"hess\"].detach().to(mean.dtype) + delta)).sqrt()\n",
             "                std = 1.0 / (state[\"hess\"].detach().to(mean.dtype) + delta).sqrt()\n",
             ("tests/test_posterior.py",)),
    Mutation("posterior-frozen-std-nonzero", "ivon_fast/posterior.py",
             "            if param.requires_grad and \"mean\" in state:\n",
             "            if \"mean\" in state:\n",
             ("tests/test_posterior.py", "-k", "by_hand or frozen_after")),
    Mutation("merge-unweighted", "ivon_fast/posterior.py",
             "        weighted_sum = sum(mean.double() * std.double().pow(-2) for mean, std in parts)\n",
             "        weighted_sum = sum(mean.double() for mean, std in parts) * precision_sum / len(parts)\n",
             ("tests/test_posterior.py", "-k", "merge")),
    Mutation("unwrap-one-level-only", WRAPPERS,
             '        current = inner\n',
             '        current = inner\n        break\n',
             ("tests/test_posterior.py", "-k", "wrappers")),
    # ---- the per-element prior (Note [per-element prior] in csrc/ivon_math.h) ----
    Mutation("reference-prior-mean-sign", REFERENCE,
             "prior_term = delta * (mean - prior_mean)",
             "prior_term = delta * (mean + prior_mean)",
             ("tests/test_reference.py", "-k", "prior")),
    Mutation("reference-sample-noise-without-prior-precision", REFERENCE,
             "    noise = _noise(_eps(eps, seed, draw, offset, mean), hess, ess, delta)\n",
             "    noise = _noise(_eps(eps, seed, draw, offset, mean), hess, ess, weight_decay)\n",
             ("tests/test_reference.py", "-k", "prior")),
    Mutation("reference-next-sample-without-prior-precision", REFERENCE,
             "weight_decay=s.weight_decay, eps=next_eps, prior_precision=prior_precision)",
             "weight_decay=s.weight_decay, eps=next_eps)",
             ("tests/test_reference.py", "-k", "prior")),
    Mutation("cpp-prior-mean-dropped-in-the-step", MATH,
             "PRIOR_MEAN ? delta * (mean - mu0) : delta * mean;",
             "delta * mean;",
             ("tests/test_kernels.py", "-k", "update_every_instance and cpu")),
    Mutation("cpp-noise-without-prior-precision", MATH,
             "  return eps / sqrtf(s.ess * (hess + delta));\n",
             "  return eps / sqrtf(s.ess * (hess + s.wd));\n",
             ("tests/test_kernels.py", "-k", "sample_matches and cpu")),
    Mutation("cpp-hess-correction-without-prior-precision", MATH,
             "(s.hess_coef * (diff * diff)) / hpd;",
             "(s.hess_coef * (diff * diff)) / (hess + s.wd);",
             ("tests/test_kernels.py", "-k", "update_every_instance and cpu")),
    Mutation("cpp-step-denominator-without-prior-precision", MATH,
             "/ (new_hess + delta);",
             "/ (new_hess + s.wd);",
             ("tests/test_kernels.py", "-k", "update_every_instance and cpu")),
    Mutation("cpu-skipped-step-samples-without-prior-precision", "csrc/cpu_kernels.h",
             "NEXT ? delta_at<RARE>(prec, k, s) : 0.0f,",
             "NEXT ? s.wd : 0.0f,",
             ("tests/test_kernels.py", "-k", "skipped_step and cpu")),
    Mutation("ops-prior-input-unchecked", "csrc/ops.cpp",
             "  check_tensor(*t, name, like, like_name, at::kFloat);\n",
             "",
             (CONTRACT_TESTS, "-k", "prior")),
    Mutation("fake-kernel-prior-mean-unchecked", "ivon_fast/_fake_ops.py",
             "prior_mean=prior_mean, prior_precision=prior_precision)",
             "prior_mean=None, prior_precision=prior_precision)",
             (CONTRACT_TESTS, "-k", "prior_mean or prior-mean")),
    Mutation("triton-prior-mean-dropped-in-the-step", TRITON,
             "prior_term = delta * (mean - _load(prior_mean_ptr, k, inside, 0.0, MASKED))",
             "prior_term = delta * mean",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton")),
    Mutation("triton-sample-noise-without-prior-precision", TRITON,
             "mean + _sigma_noise(eps, hess, ess, delta), MASKED)",
             "mean + _sigma_noise(eps, hess, ess, weight_decay), MASKED)",
             ("tests/test_kernels.py", "-k", "sample_matches and triton")),
    Mutation("triton-next-sample-without-prior-precision", TRITON,
             "_sigma_noise(_normal(seed, next_draw, quad), new_hess, ess, delta)",
             "_sigma_noise(_normal(seed, next_draw, quad), new_hess, ess, weight_decay)",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton")),
    Mutation("triton-accumulate-noise-without-prior-precision", TRITON,
             "        delta = _delta(prior_precision_ptr, k, inside, weight_decay, HAS_PRIOR_PRECISION,"
             " MASKED)\n",
             "",
             ("tests/test_kernels.py", "-k", "accumulate_matches and triton")),
    Mutation("triton-price-hess-without-prior-precision", TRITON,
             "nll_hess = (hess_term * (hess + delta)) * ess",
             "nll_hess = (hess_term * (hess + weight_decay)) * ess",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton")),
    Mutation("triton-host-drops-the-prior-precision-flag", TRITON,
             "HAS_PRIOR_MEAN=prior_mean is not None,\n"
             "            HAS_PRIOR_PRECISION=prior_precision is not None)\n",
             "HAS_PRIOR_MEAN=prior_mean is not None,\n"
             "            HAS_PRIOR_PRECISION=False)\n",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton")),
    # issue 10 (second part): wrappers, betas, checkpoints at the mean, priors, predictive,
    # HF and Lightning callbacks
    Mutation("wrapper-methods-run-on-the-wrapper", WRAPPERS,
             '        if "_layout" not in vars(self):  # a forwarding wrapper: its state lives elsewhere\n',
             '        if False:\n',
             ("tests/test_schedulers.py", "-k", "forwarding")),
    Mutation("betas-written-by-a-scheduler-ignored", GROUPS,
             '            chosen = betas if betas != seen else official\n',
             '            chosen = official\n',
             ("tests/test_schedulers.py", "-k", "momentum_cycling")),
    Mutation("gradient-at-a-late-loaded-mean-accepted", STEP,
             '        if stale:\n            raise RuntimeError(OVERWRITTEN_MESSAGE)\n',
             '        if False:\n            raise RuntimeError(OVERWRITTEN_MESSAGE)\n',
             ("tests/test_user_paths.py", "-k", "inside_mean_params")),
    Mutation("update-without-the-prior-mean", OP_LOOP,
             '        **bucket.prior_inputs(s, update=True), **rounding,\n',
             '        **bucket.prior_inputs(s), **rounding,\n',
             ("tests/test_priors.py", "-k", "by_hand")),
    Mutation("init-prior-is-zero", BUCKET,
             "                self.shaped(self.mean, index) if isinstance(source, str) else source)",
             "                torch.zeros_like(self.shaped(self.mean, index)) if isinstance(source, str) else source)",
             ("tests/test_priors.py", "-k", "init")),
    Mutation("checkpoint-prior-not-loaded", CHECKPOINT,
             '        names += [n for n in _PRIORS if getattr(bucket, n) is not None]\n',
             '        names += []\n',
             ("tests/test_priors.py", "-k", "state_dict")),
    Mutation("posterior-std-ignores-the-prior-precision", "ivon_fast/posterior.py",
             "                delta = state[\"prior_precision\"] if \"prior_precision\" in state else weight_decay\n",
             "                delta = weight_decay\n",
             ("tests/test_priors.py", "-k", "posterior_std")),
    Mutation("as-prior-without-ess", "ivon_fast/posterior.py",
             "            precisions.append((1.0 / (ess * std.double().square())).to(std.dtype))\n",
             "            precisions.append((1.0 / std.double().square()).to(std.dtype))\n",
             ("tests/test_priors.py", "-k", "posterior_std")),
    Mutation("predictive-params-not-restored", "ivon_fast/predictive.py",
             "                p.data.copy_(saved)\n",
             "                pass\n",
             ("tests/test_predictive.py",)),
    Mutation("predictive-averages-logits", "ivon_fast/predictive.py",
             "        probs = torch.softmax(logits.float(), dim=1).to(\"cpu\", torch.float64)\n",
             "        probs = logits.float().to(\"cpu\", torch.float64)\n",
             ("tests/test_predictive.py",)),
    Mutation("hf-callback-evaluates-the-sample", "ivon_fast/integrations/hf.py",
             "            stack.enter_context(self.optimizer.mean_params())\n",
             "            pass\n",
             ("tests/test_hf.py", "-k", "use_the_mean")),
    Mutation("lightning-callback-evaluates-the-sample", "ivon_fast/integrations/lightning.py",
             "        try:\n            for ivon in optimizers:\n                stack.enter_context(ivon.mean_params())\n",
             "        try:\n            for ivon in optimizers:\n                pass\n",
             ("tests/test_lightning.py", "-k", "at_the_mean")),
    Mutation("lightning-checkpoint-holds-the-sample", "ivon_fast/integrations/lightning.py",
             "                    stack.enter_context(ivon.mean_params())\n            # the entries",
             "                    pass\n            # the entries",
             ("tests/test_lightning.py", "-k", "checkpoints_hold_the_mean")),
    Mutation("samples-taken-ignores-the-pending-one", "ivon_fast/optimizer.py",
             "        return self._count + (0 if self._pending_draw is None else 1)\n",
             "        return self._count\n",
             ("tests/test_schedulers.py", "-k", "samples_taken")),
    # issue 11 (first part): bf16 state by stochastic rounding, in the reference
    Mutation("bf16-state-rounds-to-nearest", "ivon_fast/reference.py",
             "    rounded = (bits + random16) >> 16\n",
             "    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16\n",
             ("tests/test_state_dtype.py", "-k", "unbiased")),
    Mutation("bf16-rounding-bits-reused-every-step", OP_LOOP,
             '    round_draw = opt._draws.next_train if next_draw is None else next_draw\n',
             '    round_draw = 0\n',
             ("tests/test_state_dtype.py", "-k", "fresh_bits")),
    Mutation("bf16-hess-rounds-with-the-momentum-bits", "ivon_fast/reference.py",
             "    _store_state(stored_hess, new_hess, None if random is None else random >> 16)\n",
             "    _store_state(stored_hess, new_hess, None if random is None else random & 0xFFFF)\n",
             ("tests/test_state_dtype.py", "-k", "rounded_stochastically")),
    Mutation("bf16-rounding-draws-collide-with-training-draws", "ivon_fast/reference.py",
             "    draw = ROUND_DRAW_BASE + round_draw\n",
             "    draw = round_draw\n",
             ("tests/test_state_dtype.py", "-k", "philox_at_the_rounding")),
    # bf16 state in the kernels (docs/DESIGN.md section 16)
    Mutation("triton-bf16-hess-rounds-with-the-momentum-bits", TRITON,
             "        stored_hess = _bf16_round_stochastic(hess, random >> 16)\n",
             "        stored_hess = _bf16_round_stochastic(hess, random & 0xFFFF)\n",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton and state_bfloat16")),
    # ---- issue 19: the instruction diet and the quads in the buffers ----
    Mutation("triton-debias-division-skipped-below-one", TRITON,
             "    if debias != 1.0:\n        momentum = tl.div_rn(momentum, debias)\n",
             "    if debias > 1.0:\n        momentum = tl.div_rn(momentum, debias)\n",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton")),
    Mutation("triton-debias-division-always-taken", TRITON,
             "    if debias != 1.0:\n        momentum = tl.div_rn(momentum, debias)\n",
             "    momentum = tl.div_rn(momentum, debias)\n",
             ("tests/test_machine_code.py", "-k", "triton_drop_in_update_within")),
    Mutation("sass-paths-keeps-the-longest-path", "bench/sass_paths.py",
             "                if old is None or total < old[0]:",
             "                if old is None or total > old[0]:",
             ("tests/test_machine_code.py", "-k", "scenario_walk and cuda")),
    Mutation("triton-from-the-quad-masks-from-the-pointer", TRITON,
             "    first = LEAD if ORIGIN else 0  # the position of the segment's first element\n",
             "    first = 0  # the position of the segment's first element\n",
             ("tests/test_kernels_builds.py", "-k", "from_their_quad")),
    Mutation("triton-widened-views-one-element-late", TRITON,
             "(1,), t.storage_offset() - lead) for t in segment]",
             "(1,), t.storage_offset() - lead + 1) for t in segment]",
             ("tests/test_kernels_builds.py", "-k", "from_their_quad")),
    Mutation("buckets-without-quad-pads", BUCKET,
             "        start = end + (offset - end) % 4\n",
             "        start = end\n",
             ("tests/test_layout.py",)),
    Mutation("triton-bf16-rounding-ignores-the-device-draw", TRITON,
             "            round_draw = round_draw + tl.load(device_draws_ptr + 1)\n",
             "            round_draw = round_draw\n",
             ("tests/test_kernels_state.py", "-k", "rounds_with_the_device_draw and triton")),
    Mutation("triton-next-sample-around-the-unrounded-hess", TRITON,
             "        hess = stored_hess.to(tl.float32)\n",
             "        pass\n",
             ("tests/test_kernels.py", "-k", "update_every_instance and triton and state_bfloat16")),
    Mutation("triton-bf16-state-rounds-to-nearest", TRITON,
             "    rounded = (bits + random16) >> 16\n",
             "    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16\n",
             ("tests/test_kernels_state.py", "tests/test_kernels_builds.py", "-k", "unbiased or stochastic_rounding_bits")),
    Mutation("cpp-bf16-state-halves-swapped", "csrc/cpu_kernels.h",
             "    momentum_bits[k] = stochastic_round_bf16(momentum[k], w[k] & 0xffffu);\n",
             "    momentum_bits[k] = stochastic_round_bf16(momentum[k], w[k] >> 16);\n",
             ("tests/test_kernels.py", "-k", "update_every_instance and cpu and state_bfloat16")),
    Mutation("cpp-bf16-rounding-ignores-the-device-draw", MATH,
             "  const bool rounds = stores_state && a.bf16_state;\n",
             "  const bool rounds = false;\n",
             ("tests/test_kernels_state.py", "-k", "rounds_with_the_device_draw and cpu")),
    Mutation("capturable-folded-update-gets-host-draws", DRAWS,
             '        if self.device is None or not (training or update):\n',
             '        if self.device is None or not (training or next_draw is not None):\n',
             ("tests/test_capturable.py", "-k", "bf16 and folded")),
    Mutation("capturable-bf16-round-draw-a-launch-argument", OP_LOOP,
             '{"round_draw": 0 if "device_draws" in draws else round_draw}',
             '{"round_draw": round_draw}',
             ("tests/test_capturable.py", "-k", "replay_proxy_bf16 or rounding_index")),
    Mutation("sharded-bf16-state-kept-in-float32", SHARDED,
             "        sdtype, mdtype = state_dtype(dtype), moment_dtype(dtype, low_precision)\n",
             "        sdtype, mdtype = state_dtype(dtype), state_dtype(dtype)\n",
             ("tests/test_fsdp.py", "-k", "equals_unsharded or round_trip")),
    # issue 17: the op contract's rules, once for every backend (ivon_fast/_contract.py);
    # tests/test_contract.py runs one table of bad arguments through every backend
    Mutation("contract-contiguity-dropped", CONTRACT,
             "    ok is True or check(ok, \"contiguous\", name=name)\n",
             "    ok is True or check(True, \"contiguous\", name=name)\n",
             (CONTRACT_TESTS, "-k", "contiguous")),
    Mutation("contract-segment-length-unchecked", CONTRACT,
             "    ok = tensor.numel() == like.numel()\n",
             "    ok = True\n",
             (CONTRACT_TESTS, "-k", "length")),
    Mutation("contract-segment-device-unchecked", CONTRACT,
             "    ok = tensor.device == like.device\n    ok is True or check(ok, \"device\",",
             "    ok = True\n    ok is True or check(ok, \"device\",",
             (CONTRACT_TESTS, "-k", "refuses_alike and device")),
    Mutation("contract-state-dtype-unchecked", CONTRACT,
             "        ok = tensor.dtype == dtype\n",
             "        ok = True\n",
             (CONTRACT_TESTS, "-k", "refuses_alike and dtype")),
    Mutation("contract-param-dtype-unchecked", CONTRACT,
             "        ok = lead.dtype in PARAM_DTYPES\n",
             "        ok = True\n",
             (CONTRACT_TESTS, "-k", "param_dtype")),
    Mutation("contract-negative-offset-accepted", CONTRACT,
             "    ok = offset >= 0\n",
             "    ok = True\n",
             (CONTRACT_TESTS, "-k", "offset")),
    Mutation("contract-moment-dtypes-mixed", CONTRACT,
             "        ok = tensor.dtype == momentum.dtype\n",
             "        ok = True\n",
             (CONTRACT_TESTS, "-k", "moment")),
    Mutation("contract-zero-count-accepted", CONTRACT,
             "    ok = count >= 1\n    ok is True or check(ok, \"count\", count=count)\n    if grad is not None:",
             "    ok = True\n    ok is True or check(ok, \"count\", count=count)\n    if grad is not None:",
             (CONTRACT_TESTS, "-k", "count")),
    Mutation("contract-unknown-hess-approx-accepted", CONTRACT,
             "HESS_APPROXES = (\"price\", \"gradsq\")\n",
             "HESS_APPROXES = (\"price\", \"gradsq\", \"diag\")\n",
             (CONTRACT_TESTS, "-k", "hess_approx")),
    Mutation("contract-averages-not-required-with-count-above-one", CONTRACT,
             "    if grad is None or count != 1:  # the averages are read (and only then checked)\n",
             "    if grad is None:  # the averages are read (and only then checked)\n",
             (CONTRACT_TESTS, "-k", "required")),
    Mutation("contract-device-scalar-numel-unchecked", CONTRACT,
             "    ok = tensor.numel() == 1\n",
             "    ok = True\n",
             (CONTRACT_TESTS, "-k", "scalar_numel")),
    Mutation("contract-device-draws-numel-unchecked", CONTRACT,
             "    ok = tensor.numel() == count\n",
             "    ok = True\n",
             (CONTRACT_TESTS, "-k", "draws")),
    Mutation("contract-prior-inputs-unchecked", CONTRACT,
             "    if tensor is not None:\n        _segment(check, tensor, name, like, like_name, state)\n",
             "    if False:\n        _segment(check, tensor, name, like, like_name, state)\n",
             (CONTRACT_TESTS, "-k", "prior")),
    Mutation("contract-non-tensor-accepted", CONTRACT,
             "        ok = value is None or isinstance(value, torch.Tensor)\n",
             "        ok = True\n",
             (CONTRACT_TESTS, "-k", "optional_tensor")),
    Mutation("contract-integer-unchecked", CONTRACT,
             "    ok = type(value) is int or _integral(value) is not None\n",
             "    ok = True\n",
             (CONTRACT_TESTS, "-k", "integer")),
    Mutation("contract-draws-beyond-64-bits-accepted", CONTRACT,
             "    ok = 0 <= value < 1 << 64\n",
             "    ok = True\n",
             (CONTRACT_TESTS, "-k", "uint64")),
    Mutation("contract-eps-given-to-a-kernel-backend", CONTRACT,
             "        ok = reference or value is None\n",
             "        ok = True\n",
             (CONTRACT_TESTS, "-k", "eps")),
    Mutation("contract-reference-float64-state-refused", CONTRACT,
             "        if lead.dtype == torch.float64:\n            return torch.float64\n",
             "",
             (CONTRACT_TESTS, "-k", "float64")),
    Mutation("contract-dtypes-written-as-torch-writes-them", CONTRACT,
             "    return _DTYPE_NAMES.get(dtype) or str(dtype).removeprefix(\"torch.\").capitalize()\n",
             "    return str(dtype)\n",
             (CONTRACT_TESTS, "-k", "refuses_alike and dtype")),
    Mutation("fake-kernels-check-nothing", "ivon_fast/_fake_ops.py",
             "_check = _contract.torch_check\n",
             "_check = lambda ok, rule, **fields: None  # noqa: E731\n",
             (CONTRACT_TESTS, "-k", "refuses_alike and (length or contiguous)")),
    Mutation("cpp-wrapper-python-values-unchecked", "ivon_fast/cpp_backend.py",
             "_check = _contract.raise_check\n",
             "_check = lambda ok, rule, **fields: None  # noqa: E731\n",
             (CONTRACT_TESTS, "-k", "uint64 or integer")),
    Mutation("triton-sample-unchecked", TRITON,
             "    _contract.sample(param, mean, hess, seed=seed, draw=draw, offset=offset,\n                     device_draws=device_draws, prior_precision=prior_precision, eps=eps)\n",
             "",
             (CONTRACT_TESTS, "-k", "refuses_alike and (length-hess or contiguous-mean)")),
    Mutation("reference-update-unchecked", REFERENCE,
             "                     prior_precision=prior_precision, eps=eps, next_eps=next_eps,\n                     reference=True)\n",
             "                     prior_precision=prior_precision, eps=eps, next_eps=next_eps,\n                     reference=True, check=lambda ok, rule, **fields: None)\n",
             (CONTRACT_TESTS, "-k", "refuses_alike and (device-mean or moment_pair)")),
    Mutation("copies-keep-only-torch-state", OPTIMIZER,
             "    def __getstate__(self) -> dict:", "    def _unused_getstate(self) -> dict:",
             ("tests/test_copies.py", "-k", "bit_for_bit and reference and official")),
    Mutation("copies-see-every-write", BUCKET,
             "self.versions[index] = -1 if unseen[index] else param._version",
             "self.versions[index] = param._version",
             ("tests/test_copies.py", "-k", "write_it_has_not_seen")),
    Mutation("sparse-gradient-refused", BUCKET,
             "view.copy_((grad.to_dense() if grad.is_sparse else grad).reshape(view.shape))",
             "view.copy_(grad.reshape(view.shape))",
             (FAULTS, "-k", "densified")),
    Mutation("dropin-step-without-a-gradient-moves", STEP,
             "    if opt.resample_on_step and not opt._layout.gradient_arrived(grads_bound):",
             "    if False:",
             (FAULTS, "-k", "without_a_gradient_does_nothing")),
    Mutation("zero-grad-leaves-the-rest-mark", OPTIMIZER,
             "        self._layout.zero_grads()\n        self._layout.grads_at_rest = self._layout.rest_mark()\n",
             "        self._layout.zero_grads()\n",
             (FAULTS, "-k", "without_a_gradient_does_nothing and zero_grad")),
    Mutation("rest-mark-not-taken-after-the-step", OPTIMIZER,
             "        self._live.record(self.param_groups)\n        self._layout.grads_at_rest = self._layout.rest_mark()\n",
             "        self._live.record(self.param_groups)\n",
             (FAULTS, "-k", "second_dropin_step")),
    Mutation("assigned-gradient-not-a-gradient", LAYOUT,
             "and (not bucket.holds_grad(index) or bucket.grad_flat._version != version)",
             "and bucket.grad_flat._version != version",
             (FAULTS, "-k", "assigned_gradient")),
    Mutation("copy-forgets-it-was-at-rest", LAYOUT,
             "        self.grads_at_rest = self.rest_mark() if at_rest else None\n",
             "        self.grads_at_rest = None\n",
             ("tests/test_copies.py", "-k", "at_rest")),
    Mutation("params-share-the-flat-storage", BUCKET,
             "    return torch.from_dlpack(view.detach())\n",
             "    return view.detach()\n",
             ("tests/test_serialization.py", "-k", "sub_module or safetensors or accelerate_save_model")),
    Mutation("export-leaves-the-pending-sample", "ivon_fast/_ivon_opt_export.py",
             "            opt._fold_pending()   # ivon-opt folds a sample in at the block's exit\n",
             "            pass\n",
             ("tests/test_ivon_opt_equivalence.py", "-k", "exported and before_the_step")),
    Mutation("export-puts-groups-at-their-global-offset", "ivon_fast/_ivon_opt_export.py",
             "        local = slice(bucket.offsets[index] - bucket.group_start,\n",
             "        local = slice(bucket.offsets[index],\n",
             ("tests/test_ivon_opt_equivalence.py", "-k", "exported and between_steps")),
    Mutation("hf-flat-prior-silent", "ivon_fast/integrations/hf.py",
             "    if flat:\n        warnings.warn(FLAT_PRIOR_WARNING.format(count=flat), UserWarning, stacklevel=3)\n",
             "",
             ("tests/test_hf.py", "-k", "flat_prior")),
    Mutation("accumulate-takes-a-new-sample", "ivon_fast/_blocks.py",
             "    if train and opt._accumulating:\n", "    if False:\n",
             ("tests/test_accelerate.py", "-k", "one_sample and official")),
    Mutation("zero-grad-mid-accumulation-clears", OPTIMIZER,
             "        if self._in_context and self._accumulating:  # Note [gradient accumulation]\n            raise RuntimeError(messages.ZERO_GRAD_MID_ACCUMULATION)\n",
             "",
             ("tests/test_accelerate.py", "-k", "zero_grad_inside")),
    Mutation("accumulate-with-samples-allowed", "ivon_fast/_blocks.py",
             "        if opt._accumulating and opt.mc_samples > 1:\n", "        if False:\n",
             ("tests/test_accelerate.py", "-k", "several_samples")),
    Mutation("extra-sample-silent", "ivon_fast/_blocks.py",
             "        warnings.warn(EXTRA_SAMPLE_WARNING.format(\n", "        (lambda *args, **kwargs: None)(EXTRA_SAMPLE_WARNING.format(\n",
             ("tests/test_accelerate.py", "-k", "warn_without_accumulate")),
    Mutation("ece-edge-in-the-bin-below", "ivon_fast/predictive.py",
             "torch.bucketize(confidence.float(), edges, right=True)",
             "torch.bucketize(confidence.float(), edges, right=False)",
             ("tests/test_predictive.py", "-k", "bin_edge")),
    Mutation("ivon-opt-averages-read-group-local", "ivon_fast/_checkpoint.py",
             "            flat = slice(bucket.offsets[index], bucket.offsets[index] + size)\n",
             "            flat = slice(bucket.offsets[index] - bucket.group_start, bucket.offsets[index] - bucket.group_start + size)\n",
             ("tests/test_optimizer.py", "-k", "between_the_samples_of_a_step")),
    Mutation("ivon-opt-count-ignored", "ivon_fast/_checkpoint.py",
             "        opt._count = count\n        if not opt.resample_on_step:\n",
             "        opt._count = 0\n        if not opt.resample_on_step:\n",
             ("tests/test_optimizer.py", "-k", "between_the_samples_of_a_step")),
    Mutation("failed-block-keeps-the-device-draw", DRAWS,
             "        self.next_train -= 1\n        if self.device is not None:\n            self.device.sub_(1)\n",
             "        self.next_train -= 1\n",
             ("tests/test_capturable.py", "-k", "device_draw_back")),
    Mutation("hf-save-without-evaluation-at-the-sample", "ivon_fast/integrations/hf.py",
             "    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):\n        if control.should_evaluate or control.should_save:\n",
             "    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):\n        if control.should_evaluate:\n",
             ("tests/test_hf.py", "-k", "steps_without_evaluation")),
    Mutation("triton-nearest-even-sees-only-the-canonical-nan", TRITON,
             "    rounded = tl.where(value != value, 0x7FC0, rounded)\n",
             "    rounded = tl.where(bits == 0x7FC00000, 0x7FC0, rounded)\n",
             ("tests/test_kernels_state.py", "-k", "nearest_even and triton")),
    Mutation("cpp-nearest-even-sees-only-the-canonical-nan", MATH,
             "  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;\n  return BF16{",
             "  const bool nan = (u & 0x7fffffffu) == 0x7fc00000u;\n  return BF16{",
             ("tests/test_kernels_state.py", "-k", "nearest_even and cpu")),
    Mutation("lightning-exception-keeps-the-mean-phase-write", "ivon_fast/integrations/lightning.py",
             "            stack.__exit__(type(exception), exception, exception.__traceback__)\n",
             "            stack.close()\n",
             ("tests/test_lightning.py", "-k", "after_a_write")),
    Mutation("written-param-adopted-in-the-first-bucket", LAYOUT,
             "yield from ((bucket, index) for index in bucket.written())",
             "yield from ((self.buckets[0], index) for index in bucket.written())",
             (USER_PATHS, "-k", "one_bucket_leaves")),
    Mutation("frozen-params-take-state", LAYOUT,
             "            elif trains(param):\n",
             "            elif param.numel() > 0:\n",
             ("tests/test_bench_smoke.py", "-k", "memory_bench")),
    Mutation("bound-grads-always-arrived", LAYOUT,
             "        if grads_bound:\n            return any(bucket.grad_flat._version != version\n",
             "        if grads_bound:\n            return True or any(bucket.grad_flat._version != version\n",
             (FAULTS, "-k", "second_dropin_step")),
    Mutation("copies-keep-stale-grad-views", BUCKET,
             "            if held[index]:\n                param.grad = self.grad_views[index]\n",
             "",
             ("tests/test_copies.py", "-k", "independent")),
    Mutation("copies-keep-stale-state-views", OPTIMIZER,
             "        super().__setstate__(state)\n        self._layout.state_views_into(self.state)\n",
             "        super().__setstate__(state)\n",
             ("tests/test_copies.py", "-k", "bit_for_bit and plain_pickle and reference")),
    Mutation("copied-model-drags-the-hf-phase", "ivon_fast/integrations/hf.py",
             "    def __reduce__(self):", "    def _unused_reduce(self):",
             ("tests/test_copies.py", "-k", "hf_callback")),
    # ---- the CUDA kernels, run on the CPU (Note [the CUDA source on the CPU]) ----
    Mutation("cuda-quad-first-element-off-by-one", CUDA,
             "    body(l.a, q, 4 * q - l.a.offset);\n",
             "    body(l.a, q, 4 * q - l.a.offset + 1);\n",
             CUDA_ON_CPU),
    Mutation("cuda-vector-quad-first-element-off-by-one", CUDA,
             "    body(l.vec, l.quads.vec_lo + i, int64_t(4 * i));\n",
             "    body(l.vec, l.quads.vec_lo + i, int64_t(4 * i + 4));\n",
             CUDA_ON_CPU),
    Mutation("cuda-vector-path-ignores-the-segment-offset", CUDA,
             "  const uintptr_t lead = uintptr_t(offset & 3) * uintptr_t(elem_bytes);",
             "  const uintptr_t lead = 0;",
             CUDA_ON_CPU),
    Mutation("cuda-vector-path-ignores-the-quad-bounds", CUDA,
             "hi = (a.offset + a.n) >> 2;  // whole quads inside",
             "hi = (a.offset + a.n + 3) >> 2;  // whole quads inside",
             CUDA_ON_CPU),
    Mutation("cuda-vector-path-ignores-prior-mean-alignment", CUDA,
             "lines_up(a.prior_precision, 4, o) &&\n         lines_up(a.prior_mean, 4, o);",
             "lines_up(a.prior_precision, 4, o);",
             CUDA_ON_CPU),
    Mutation("cuda-last-partial-quad-dropped", CUDA,
             "end = ((a.offset + a.n - 1) >> 2) + 1;",
             "end = ((a.offset + a.n - 1) >> 2);",
             CUDA_ON_CPU),
    Mutation("cuda-partial-quads-never-run", CUDA,
             "l.quads.n_scalar = done == 0 ? all.n_scalar : 0;",
             "l.quads.n_scalar = 0;",
             CUDA_ON_CPU),
    Mutation("cuda-scalar-access-one-past-the-end", CUDA,
             "bool inside(int64_t k, int64_t n) { return k >= 0 && k < n; }",
             "bool inside(int64_t k, int64_t n) { return k >= 0 && k <= n; }",
             CUDA_ON_CPU),
    Mutation("cuda-grid-stride-of-one-block", CUDA,
             "       i += int64_t(gridDim.x) * blockDim.x)",
             "       i += int64_t(blockDim.x))",
             CUDA_ON_CPU),
    Mutation("cuda-vector-loop-stride-of-one-block", CUDA,
             "stride = gridDim.x * blockDim.x;",
             "stride = blockDim.x;",
             CUDA_ON_CPU),
    Mutation("cuda-bf16-state-vector-store-swaps-a-pair", CUDA,
             "uint32_t(b[2]) | (uint32_t(b[3]) << 16));",
             "uint32_t(b[3]) | (uint32_t(b[2]) << 16));",
             CUDA_ON_CPU),
    Mutation("cuda-debias-skipped-below-one", CUDA,
             "d.s.debias == 1.0f,",
             "d.s.debias <= 1.0f,",
             CUDA_ON_CPU),
    Mutation("cuda-clip-skipped", CUDA,
             "!(d.s.clip == INFINITY), rare};",
             "false, rare};",
             CUDA_ON_CPU),
    Mutation("cuda-prior-mean-in-the-common-loop", CUDA,
             "a.prior_precision != nullptr || a.prior_mean != nullptr;",
             "a.prior_precision != nullptr;",
             CUDA_ON_CPU),
    # issue 19: the CPU update's rare inputs in one instance with neutral values (Note [rare
    # inputs of an update]) and the noise pipeline of the other instances (Note [where the
    # noise is pipelined]); the debias-of-one and pipeline rows mutate code only the AVX-512
    # build has, so only a machine with AVX-512 (as the VM and CI) can kill them
    Mutation("cpu-neutral-grad-scale-not-one", "csrc/scalars.h",
             "  float grad_scale = 1.0f;",
             "  float grad_scale = 1.0001f;",
             ("tests/test_kernels.py", "-k", "update_every_instance and cpu")),
    Mutation("cpu-bf16-state-block-at-the-wrong-positions", "csrc/cpu_kernels.h",
             "state_elems<true>(state, r.k_lo, r.k_hi - r.k_lo, buffer + r.shift + r.k_lo);",
             "state_elems<true>(state, r.k_lo, r.k_hi - r.k_lo, buffer + r.k_lo);",
             ("tests/test_kernels_state.py", "-k", "cpu")),
    Mutation("cpu-neutral-prior-precision-not-the-weight-decay", "csrc/cpu_kernels.h",
             "std::fill_n(wd_, kElems, wd);",
             "std::fill_n(wd_, kElems, wd * 1.5f);",
             ("tests/test_kernels.py", "-k", "update_every_instance and cpu")),
    Mutation("cpu-neutral-prior-mean-not-zero", "csrc/cpu_kernels.h",
             "std::fill_n(zero_, kElems, 0.0f);",
             "std::fill_n(zero_, kElems, 1e-3f);",
             ("tests/test_kernels.py", "-k", "update_every_instance and cpu")),
    Mutation("cpu-rare-dispatch-ignores-the-prior-mean", "csrc/dispatch_flags.h",
             "a.grad_scale != nullptr || a.prior_precision != nullptr || a.prior_mean != nullptr;",
             "a.grad_scale != nullptr || a.prior_precision != nullptr;",
             ("tests/test_kernels.py", "-k", "update_every_instance and cpu")),
    Mutation("cpu-debias-one-taken-below-one", "csrc/cpu_kernels.h",
             "const bool debias_one = s.debias == 1.0f;",
             "const bool debias_one = s.debias <= 1.0f;",
             ("tests/test_kernels.py", "tests/test_kernels_builds.py", "-k", "cpu")),
    Mutation("cpu-debias-one-path-halves-the-momentum", MATH,
             "DEBIAS_ONE ? momentum : debiased(momentum, s);",
             "DEBIAS_ONE ? 0.5f * momentum : debiased(momentum, s);",
             ("tests/test_kernels_builds.py", "-k", "cpu_isa_builds_agree")),
    Mutation("cpu-pipelined-noise-one-quad-late", "csrc/cpu_kernels.h",
             "dr[c] = draw[c % D], qs[c] = q_next + h, outs[c] = ne[c % D] + 4 * h;",
             "dr[c] = draw[c % D], qs[c] = q_next + h + 1, outs[c] = ne[c % D] + 4 * h;",
             ("tests/test_kernels.py", "tests/test_kernels_builds.py", "-k", "cpu")),
]

def _log(message: str) -> None:
    print(message, flush=True)


def _copy_repository(destination: str) -> None:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode()
    for relative in filter(None, listed.split("\0")):
        source = os.path.join(REPO, relative)
        if not os.path.isfile(source):  # tracked but deleted in the working tree
            continue
        target = os.path.join(destination, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(source, target)


def _apply(root: str, mutation: Mutation, write: bool = True) -> None:
    """Mutate the file under ``root`` (or, with write=False, only check that it can be)."""
    path = os.path.join(root, mutation.file)
    with open(path) as f:
        text = f.read()
    found = text.count(mutation.old)
    if found != 1:
        raise SetupError(f"{mutation.name}: its text occurs {found} times in {mutation.file}, "
                         "not once; update the mutation to the current code")
    if write:
        with open(path, "w") as f:
            f.write(text.replace(mutation.old, mutation.new))


def _environment(copy: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [copy, env.get("PYTHONPATH")]))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _carry_cpu_run_build(copy: str) -> None:
    """The test build of the CUDA source on the CPU (tests/cuda_on_cpu_build.py), linked into
    the copy: its objects are named by the hash of their sources (Note [the CPU run's build
    cache]), so the copy recompiles only what its mutation changed."""
    source = os.path.join(REPO, "build", "cuda_on_cpu")
    if not os.path.isdir(source):
        return
    target = os.path.join(copy, "build", "cuda_on_cpu")
    try:  # links cost nothing, and a build replaces files rather than writing into them
        shutil.copytree(source, target, copy_function=os.link)
    except OSError:  # another file system
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)


def _prepare_extension(copy: str, rebuild: bool) -> None:
    if rebuild:
        env = dict(_environment(copy), IVON_FAST_NO_CUDA="1", MAX_JOBS="2")
        build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=copy,
                               env=env, capture_output=True, text=True)
        if build.returncode != 0:
            raise SetupError(f"building the extension failed:\n{build.stderr[-3000:]}")
        return
    # the extension and setup.py's record of what it was built against (ivon_fast/_extension.py
    # loads no extension without it); both are git-ignored
    built = glob.glob(os.path.join(REPO, "ivon_fast", "_C*.so"))
    record = os.path.join(REPO, "ivon_fast", "_build_info.py")
    if not built or not os.path.exists(record):
        raise SetupError("no built ivon_fast/_C*.so (and _build_info.py) in the repository: "
                         "build the extension first")
    for path in built + [record]:
        shutil.copy2(path, os.path.join(copy, "ivon_fast"))


def _check_imports(copy: str) -> None:
    """The copy's ivon_fast, with a working extension, must be the one imported, not the editable
    install's."""
    probe = ("import ivon_fast, ivon_fast.cpp_backend as c; print(ivon_fast.__file__); "
             "print(c.unavailable_reason('cpu'))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=_environment(copy),
                            capture_output=True, text=True)
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) < 2:
        raise SetupError(f"importing ivon_fast in the copy failed:\n{result.stderr[-3000:]}")
    package_file, extension_problem = lines[-2], lines[-1]
    if not os.path.realpath(package_file).startswith(os.path.realpath(copy) + os.sep):
        raise SetupError(f"the copy imports {package_file}, not its own ivon_fast")
    if extension_problem != "None":
        raise SetupError(f"the copy's extension does not load: {extension_problem}")


def _pytest_passes(copy: str, args: tuple) -> tuple[bool, str]:
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
    result = subprocess.run(command, cwd=copy, env=_environment(copy), capture_output=True,
                            text=True)
    # exit status 5: no test collected, which must not count as a kill
    if result.returncode == 5:
        raise SetupError(f"pytest {' '.join(args)} selects no test")
    lines = result.stdout.strip().splitlines()
    return result.returncode == 0, lines[-1] if lines else result.stderr[-300:]


def _prepared_copy(parent: str, mutation: Mutation | None) -> str:
    copy = tempfile.mkdtemp(prefix=(mutation.name if mutation else "baseline") + "-", dir=parent)
    _copy_repository(copy)
    if mutation is not None:
        _apply(copy, mutation)
    # the mutation build is CPU-only (IVON_FAST_NO_CUDA), so a CUDA source or header needs no
    # rebuild; the CPU run of the CUDA source rebuilds what changed itself
    rebuild = (mutation is not None and mutation.file.startswith("csrc/")
               and not mutation.file.endswith((".cu", ".cuh")))
    _prepare_extension(copy, rebuild=rebuild)
    _carry_cpu_run_build(copy)
    _check_imports(copy)
    return copy


def run(mutations: list[Mutation]) -> int:
    for mutation in mutations:  # fail in seconds, not after the baseline, on a stale mutation
        _apply(REPO, mutation, write=False)
    with tempfile.TemporaryDirectory(prefix="ivon_mutate_") as parent:
        baseline = _prepared_copy(parent, None)
        for args in dict.fromkeys(m.pytest_args for m in mutations):
            passed, summary = _pytest_passes(baseline, args)
            if not passed:
                raise SetupError(f"pytest {' '.join(args)} fails without any mutation: {summary}")
            _log(f"baseline  pytest {' '.join(args)}: {summary}")
        shutil.rmtree(baseline)
        survived = []
        for mutation in mutations:
            start = time.monotonic()
            copy = _prepared_copy(parent, mutation)
            passed, summary = _pytest_passes(copy, mutation.pytest_args)
            shutil.rmtree(copy)
            verdict = "SURVIVED" if passed else "KILLED"
            _log(f"{verdict:8}  {mutation.name}  ({time.monotonic() - start:.0f} s; {summary})")
            if passed:
                survived.append(mutation.name)
    _log(f"{len(mutations) - len(survived)} of {len(mutations)} mutations killed"
         + (f"; survived: {', '.join(survived)}" if survived else ""))
    return 1 if survived else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutations")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    options = parser.parse_args(argv)
    if options.list:
        for m in MUTATIONS:
            _log(f"{m.name:40}  {m.file:28}  pytest {' '.join(m.pytest_args)}")
        return 0
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [name for name in options.only or () if name not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s): {', '.join(unknown)} (see --list)")
    selected = [by_name[name] for name in options.only] if options.only else MUTATIONS
    try:
        return run(selected)
    except SetupError as error:
        _log(f"mutation check could not run: {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
