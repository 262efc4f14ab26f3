// AVX2 + FMA copy of the CPU kernels (setup.py: -DCPU_CAPABILITY=AVX2 -mavx2 -mfma ...).
#include "../gather_logprobs.cpp"
#include "../kl_penalty.cpp"
#include "../gae.cpp"
#include "../group_advantages.cpp"
#include "../masked_whiten.cpp"
#include "../ranking_loss.cpp"
#include "../sample.cpp"
#include "../few_row_linear.cpp"
