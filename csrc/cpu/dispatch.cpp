#include "cpu/dispatch.h"

#include <ATen/Version.h>

#include <string>

#include "cpu/kernels.h"

#ifndef FASTRLHF_IS_X86  // setup.py defines it; this fallback serves other build systems
#if defined(__x86_64__) || defined(_M_X64)
#define FASTRLHF_IS_X86 1
#else
#define FASTRLHF_IS_X86 0
#endif
#endif

namespace fastrlhf::cpu {

namespace DEFAULT {
FASTRLHF_CPU_KERNEL_DECLARATIONS
}
#if FASTRLHF_IS_X86
namespace AVX2 {
FASTRLHF_CPU_KERNEL_DECLARATIONS
}
namespace AVX512 {
FASTRLHF_CPU_KERNEL_DECLARATIONS
}
#endif

namespace {

enum class Capability { kDefault, kAvx2, kAvx512 };

Capability detect_capability() {
#if FASTRLHF_IS_X86
  // at::get_cpu_capability() is the exported form of at::native::get_cpu_capability() (which
  // libtorch does not export): torch's own pick, after ATEN_CPU_CAPABILITY and CPU checks. Newer
  // torch may name AVX512 variants (e.g. "AVX512_VNNI"); all of them run the AVX512 copy.
  const std::string cap = at::get_cpu_capability();
  if (cap.rfind("AVX512", 0) == 0) return Capability::kAvx512;
  if (cap.rfind("AVX2", 0) == 0) return Capability::kAvx2;
#endif
  return Capability::kDefault;
}

Capability capability() {
  static const Capability cap = detect_capability();  // torch reads the env var once, too
  return cap;
}

}  // namespace

const char* capability_name() {
  switch (capability()) {
    case Capability::kAvx512:
      return "avx512";
    case Capability::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

// Calls `fn` from the kernel copy selected at run time.
#if FASTRLHF_IS_X86
#define FASTRLHF_CPU_DISPATCH(fn, ...)             \
  switch (capability()) {                          \
    case Capability::kAvx512:                      \
      return AVX512::fn(__VA_ARGS__);              \
    case Capability::kAvx2:                        \
      return AVX2::fn(__VA_ARGS__);                \
    default:                                       \
      return DEFAULT::fn(__VA_ARGS__);             \
  }
#else
#define FASTRLHF_CPU_DISPATCH(fn, ...) return DEFAULT::fn(__VA_ARGS__);
#endif

void gather_logprobs_forward(const GatherLogprobsForwardParams& p) {
  FASTRLHF_CPU_DISPATCH(gather_logprobs_forward_kernel, p)
}

void gather_logprobs_backward(const GatherLogprobsBackwardParams& p) {
  FASTRLHF_CPU_DISPATCH(gather_logprobs_backward_kernel, p)
}

void gather_logprobs_fold(const GatherLogprobsFoldParams& p) { FASTRLHF_CPU_DISPATCH(gather_logprobs_fold_kernel, p) }

void gather_logprobs_finalize(const GatherLogprobsFinalizeParams& p) {
  FASTRLHF_CPU_DISPATCH(gather_logprobs_finalize_kernel, p)
}

void kl_penalty_forward(const KLPenaltyParams& p) { FASTRLHF_CPU_DISPATCH(kl_penalty_forward_kernel, p) }

void kl_penalty_sums(const KLPenaltySumsParams& p) { FASTRLHF_CPU_DISPATCH(kl_penalty_sums_kernel, p) }

void kl_penalty_backward(const KLPenaltyGradParams& p) { FASTRLHF_CPU_DISPATCH(kl_penalty_backward_kernel, p) }

void gae_forward(const GaeParams& p) { FASTRLHF_CPU_DISPATCH(gae_forward_kernel, p) }

void advantages_forward(const AdvantagesParams& p) { FASTRLHF_CPU_DISPATCH(advantages_forward_kernel, p) }

void group_advantages_forward(const GroupAdvantagesParams& p) {
  FASTRLHF_CPU_DISPATCH(group_advantages_forward_kernel, p)
}

void masked_whiten(const MaskedWhitenParams& p) { FASTRLHF_CPU_DISPATCH(masked_whiten_kernel, p) }

void ranking_loss_forward(const RankingLossForwardParams& p) {
  FASTRLHF_CPU_DISPATCH(ranking_loss_forward_kernel, p)
}

void sample_forward(const SampleParams& p) {
  FASTRLHF_CPU_DISPATCH(sample_forward_kernel, p)
}

void few_row_linear_pack(const FewRowPackParams& p) {
  FASTRLHF_CPU_DISPATCH(few_row_linear_pack_kernel, p)
}

void few_row_linear_forward(const FewRowLinearParams& p) {
  FASTRLHF_CPU_DISPATCH(few_row_linear_forward_kernel, p)
}

void ppo_loss_forward(const PPOLossForwardParams& p) { FASTRLHF_CPU_DISPATCH(ppo_loss_forward_kernel, p) }

void ppo_loss_backward(const PPOLossBackwardParams& p) { FASTRLHF_CPU_DISPATCH(ppo_loss_backward_kernel, p) }

}  // namespace fastrlhf::cpu
