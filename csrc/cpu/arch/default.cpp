// Baseline copy of the CPU kernels (setup.py: -DCPU_CAPABILITY=DEFAULT, no extra ISA flags).
// setup.py links default before avx2 before avx512, so for any inline function emitted
// out of line by several copies the linker keeps the baseline one.
#include "../gather_logprobs.cpp"
#include "../kl_penalty.cpp"
#include "../gae.cpp"
#include "../group_advantages.cpp"
#include "../masked_whiten.cpp"
#include "../ranking_loss.cpp"
#include "../sample.cpp"
#include "../few_row_linear.cpp"
#include "../ppo_loss.cpp"
