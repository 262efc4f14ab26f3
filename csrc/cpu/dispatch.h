// Run-time selection of the CPU kernel copy (see csrc/cpu/kernels.h).
#pragma once

#include "common/gae_params.h"
#include "common/gather_logprobs_params.h"
#include "common/group_advantages_params.h"
#include "common/kl_penalty_params.h"
#include "common/masked_whiten_params.h"
#include "common/ppo_loss_params.h"
#include "common/ranking_loss_params.h"
#include "common/few_row_linear_params.h"
#include "common/sample_params.h"

namespace fastrlhf::cpu {

// The kernel copy used at run time: "avx512", "avx2" or "default". Follows torch's own choice,
// so ATEN_CPU_CAPABILITY=default|avx2|avx512 forces each copy.
const char* capability_name();

void gather_logprobs_forward(const GatherLogprobsForwardParams& p);
void gather_logprobs_backward(const GatherLogprobsBackwardParams& p);
void gather_logprobs_fold(const GatherLogprobsFoldParams& p);
void gather_logprobs_finalize(const GatherLogprobsFinalizeParams& p);

void kl_penalty_forward(const KLPenaltyParams& p);
void kl_penalty_sums(const KLPenaltySumsParams& p);
void kl_penalty_backward(const KLPenaltyGradParams& p);
void gae_forward(const GaeParams& p);
void advantages_forward(const AdvantagesParams& p);
void group_advantages_forward(const GroupAdvantagesParams& p);
// Whitens p.x into p.out over p.mask and stores the number of set positions in *p.count.
void masked_whiten(const MaskedWhitenParams& p);
void ranking_loss_forward(const RankingLossForwardParams& p);
void sample_forward(const SampleParams& p);
void few_row_linear_pack(const FewRowPackParams& p);
void few_row_linear_forward(const FewRowLinearParams& p);
void ppo_loss_forward(const PPOLossForwardParams& p);
void ppo_loss_backward(const PPOLossBackwardParams& p);

}  // namespace fastrlhf::cpu
