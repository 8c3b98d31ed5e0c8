// scalars.h: the per-launch hyperparameters, a plain struct shared by every kernel TU.
#pragma once

namespace ivon_fast {

// Host-combined hyperparameters: every product of Python scalars is formed in double on the host
// (as ivon-opt / the reference do) and rounded to float once.
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
  float pad_;
};

}  // namespace ivon_fast
