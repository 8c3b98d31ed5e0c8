"""The training loop's error messages: what went wrong, and the pattern that works instead.

Raised by the state machine (``optimizer``) and ``step(closure)`` (``_closure``); kept in one place
so that the loops they teach read alike.
"""

NO_SAMPLE_MESSAGE = (
    "IVON.step() was called without a gradient from a posterior sample. IVON has two training "
    "loops:\n"
    "  1. the official loop (resample_on_step=False):\n"
    "         for _ in range(mc_samples):\n"
    "             with optimizer.sampled_params(train=True):\n"
    "                 optimizer.zero_grad(); loss_fn(model(x), y).backward()\n"
    "         optimizer.step()\n"
    "  2. the AdamW-style drop-in loop, with IVON(..., resample_on_step=True):\n"
    "         loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()\n"
    "or pass a closure: optimizer.step(closure) draws one sample per closure call.")

CLEARED_MESSAGE = (
    "the gradient of the last posterior sample changed before it was used: a sample beyond "
    "mc_samples={mc} was taken after the gradients were cleared or modified (zero_grad on the "
    "model, or an assignment to .grad) between two sampled_params(train=True) blocks. Set "
    "mc_samples to the number of samples you take per step, or clear gradients inside the block "
    "or with optimizer.zero_grad().")

DROPPED_MESSAGE = (
    "the gradient of the last posterior sample was set to None before step(), e.g. by "
    "model.zero_grad() between the sampled_params(train=True) block and step(): the sample "
    "would be lost. Clear gradients inside the block, or with optimizer.zero_grad(), which folds "
    "the sample into the step first.")

OVERWRITTEN_MESSAGE = (
    "the gradient was computed at weights loaded into the model after "
    "optimizer.load_state_dict() (a model checkpoint that holds the posterior mean, e.g. saved "
    "inside mean_params() by the Hugging Face or Lightning callback), not at the posterior "
    "sample the optimizer's state records for this step. The params hold that sample again "
    "now: call optimizer.zero_grad() and compute the gradient again, and when resuming load "
    "the model's state dict before the optimizer's.")

UNSCALED_FOLDED_MESSAGE = (
    "GradScaler: scaler.unscale_(optimizer) unscaled only the gradient of the last posterior "
    "sample, but {count} earlier sample(s) of this step were already folded into the step's "
    "averages while still scaled, and the optimizer is not told the scale. With mc_samples > 1 "
    "let scaler.step(optimizer) unscale (do not call scaler.unscale_ before it); the optimizer "
    "then divides every sample by the scale inside its kernels.")

OFFICIAL_LOOP_ONLY = (
    "sampled_params(train=True) is the official loop; with resample_on_step=True the params "
    "already hold a training sample: call loss.backward(); optimizer.step()")

WRITTEN_INSIDE_SAMPLE = (
    "parameters were written inside sampled_params(); the block was undone and the write "
    "discarded. Write to parameters outside the block, or inside mean_params() to set the mean.")

_ACCUMULATION_PATTERN = (
    "    for _ in range(optimizer.mc_samples):\n"
    "        with optimizer.sampled_params(train=True):\n"
    "            optimizer.zero_grad()\n"
    "            for micro_batch in micro_batches:\n"
    "                (loss_fn(model, micro_batch) / len(micro_batches)).backward()\n"
    "    optimizer.step()")

EXTRA_SAMPLE_WARNING = (
    "IVON took training sample {taken} for one step with mc_samples={mc}: the samples are "
    "averaged as Monte Carlo samples (as ivon-opt does). If you meant more samples, set "
    "mc_samples to their number to silence this. If you meant gradient accumulation, each "
    "sampled_params(train=True) block draws a new sample, and a gradient not cleared between "
    "blocks is counted again; accumulate the micro-batches inside one block per sample:\n"
    + _ACCUMULATION_PATTERN)

ACCUMULATION_WITH_SAMPLES = (
    "gradient accumulation (accelerate's accumulate() skips this step) with mc_samples={mc}: "
    "the micro-batches of one step would be spread over different posterior samples. With "
    "mc_samples=1 IVON keeps one sample for all micro-batches of a step; for more samples, "
    "accumulate the micro-batches inside one block per sample, without accumulate():\n"
    + _ACCUMULATION_PATTERN)

ZERO_GRAD_MID_ACCUMULATION = (
    "zero_grad() inside the sampled_params(train=True) block of a later micro-batch of "
    "accelerate's accumulate() would clear the gradient of the step's earlier micro-batches "
    "(accelerate lets zero_grad() through on the last micro-batch only); the block was undone. "
    "With gradient accumulation, clear the gradients after the step, outside the block:\n"
    "    for batch in loader:\n"
    "        with accelerator.accumulate(model):\n"
    "            with optimizer.sampled_params(train=True):\n"
    "                accelerator.backward(loss_fn(model, batch))\n"
    "            optimizer.step()\n"
    "            optimizer.zero_grad()")
