// The persistent lstm_projection forward's host side (csrc/cuda/lstm_persistent_glue.cpp).
#pragma once

#include "common/lstm_driver.h"

namespace elmo_fast {

// Runs steps [s_begin, s_end) with the persistent kernel (Note [persistent LSTM]) and returns true
// when ELMO_FAST_LSTM_KERNEL (or elmo_fast.set_kernel("lstm", ...)) chooses it and it can serve the
// call; returns false (the driver steps) when it is not chosen, or chosen by "auto" and it cannot;
// raises when it was asked for by name and cannot.
bool run_persistent_steps(const LstmSteps& steps);

}  // namespace elmo_fast
