// Entry points of the CPU kernels. csrc/cpu/arch/<cap>.cpp compiles every kernel once per CPU
// capability inside namespace fastrlhf::cpu::<CPU_CAPABILITY> (DEFAULT, AVX2, AVX512), so each
// copy has its own symbols; csrc/cpu/dispatch.cpp declares all copies and picks one at run time.
// List every op here once; a copy whose definition drifts from this list fails at import with an
// undefined symbol.
#pragma once

#include "common/few_row_linear_params.h"
#include "common/gae_params.h"
#include "common/gather_logprobs_params.h"
#include "common/group_advantages_params.h"
#include "common/kl_penalty_params.h"
#include "common/masked_whiten_params.h"
#include "common/ppo_loss_params.h"
#include "common/ranking_loss_params.h"
#include "common/sample_params.h"

#define FASTRLHF_CPU_KERNEL_DECLARATIONS                                                   \
  void gather_logprobs_forward_kernel(const ::fastrlhf::GatherLogprobsForwardParams& p);   \
  void gather_logprobs_backward_kernel(const ::fastrlhf::GatherLogprobsBackwardParams& p); \
  void gather_logprobs_fold_kernel(const ::fastrlhf::GatherLogprobsFoldParams& p);         \
  void gather_logprobs_finalize_kernel(const ::fastrlhf::GatherLogprobsFinalizeParams& p); \
  void kl_penalty_forward_kernel(const ::fastrlhf::KLPenaltyParams& p);                    \
  void kl_penalty_sums_kernel(const ::fastrlhf::KLPenaltySumsParams& p);                   \
  void kl_penalty_backward_kernel(const ::fastrlhf::KLPenaltyGradParams& p);               \
  void gae_forward_kernel(const ::fastrlhf::GaeParams& p);                                 \
  void advantages_forward_kernel(const ::fastrlhf::AdvantagesParams& p);                   \
  void group_advantages_forward_kernel(const ::fastrlhf::GroupAdvantagesParams& p);        \
  void masked_whiten_kernel(const ::fastrlhf::MaskedWhitenParams& p);                      \
  void ranking_loss_forward_kernel(const ::fastrlhf::RankingLossForwardParams& p);         \
  void sample_forward_kernel(const ::fastrlhf::SampleParams& p);                          \
  void few_row_linear_pack_kernel(const ::fastrlhf::FewRowPackParams& p);                 \
  void few_row_linear_forward_kernel(const ::fastrlhf::FewRowLinearParams& p);            \
  void ppo_loss_forward_kernel(const ::fastrlhf::PPOLossForwardParams& p);                \
  void ppo_loss_backward_kernel(const ::fastrlhf::PPOLossBackwardParams& p);
