// scalars.h: the per-launch hyperparameters, a plain struct shared by every kernel TU.
#pragma once

namespace ivon_fast {

// Host-combined hyperparameters: every combination of Python scalars (1 - beta1, 0.5 (1 - beta2)^2,
// the rescaled lr, the debias factor) is formed in double by ivon_fast/scalars.py, as ivon-opt and
// the reference form it, and rounded to float once by the op (ops.cpp).
struct Scalars {
  float ess;          // lambda
  float wd;           // delta
  float beta1, one_minus_beta1;
  float beta2, one_minus_beta2;
  float hess_coef;    // 0.5 * (1 - beta2)^2
  float lr;           // effective lr
  float debias;       // 1 - beta1^t, or 1
  float clip;         // rho (may be inf)
  float count;        // MC sample count as a float (divisor of the running mean)
  // update: the GradScaler's scale, read on the device when the op got one (read_device_scalars
  // in ivon_math.h); 1 otherwise, the neutral value the CPU update's rare instance divides by
  // (Note [rare inputs of an update] in cpu_kernels.h)
  float grad_scale = 1.0f;
};

}  // namespace ivon_fast
