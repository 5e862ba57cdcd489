// The CPU kernels on raw pointers, one function per element type, each handling a range of
// independent work items so that csrc/ops.cpp can split the range with at::parallel_for.
// Shapes, dtypes, strides and index ranges are checked in ops.cpp before any of these run.
#pragma once

#include <cstdint>

namespace rlvr_fast::cpu {

enum class Dtype { f32, bf16, f16 };

// ------------------------------------------------------------------ decode attention
// Work item i = (sequence b = i / kv_heads, kv head h = i % kv_heads): the G = groups query heads
// h * G .. h * G + G - 1 of sequence b attend to its first context_lens[b] cached tokens.
// Strides are in elements; q, out [B, Hq, D] and the caches [blocks, block_size, Hkv, D] all have
// unit stride along D. q, caches and out share the element type.
struct AttentionArgs {
  const void* q;
  const void* k_cache;
  const void* v_cache;
  void* out;
  const int32_t* block_tables;  // [B, max_blocks], row stride table_stride
  const int32_t* context_lens;  // [B]
  int64_t q_stride_b, q_stride_h, out_stride_b, out_stride_h;
  int64_t cache_stride_block, cache_stride_slot, cache_stride_head;
  int64_t table_stride;
  int64_t block_size, kv_heads, groups, head_dim;
  float scale;
};

void paged_attention(Dtype dtype, const AttentionArgs& args, int64_t begin, int64_t end);

// ------------------------------------------------------------------ sampling
// Work item = one row of logits. See sampling.cpp for the method (the one of
// kernels/paged_reference.py: sample_ref).
struct SampleArgs {
  const void* logits;  // [B, vocab], unit stride along vocab
  int64_t row_stride;
  int64_t vocab;
  const int64_t* keys;  // [B]; may be null when temperature == 0
  double temperature;   // 0: greedy
  int64_t top_k;        // 0: off
  double top_p;         // 1: off
  int64_t* tokens;      // [B] out
  float* logprobs;      // [B] out
};

void sample(Dtype dtype, const SampleArgs& args, int64_t begin, int64_t end);

// ------------------------------------------------------------------ decoder-layer ops
// Work item = one row of x [N, hidden] (unit stride along hidden); out [N, hidden] contiguous.
struct RmsNormArgs {
  const void* x;
  int64_t x_stride;
  const void* weight;  // [hidden]
  void* out;
  int64_t hidden;
  float eps;
};

void rms_norm(Dtype dtype, const RmsNormArgs& args, int64_t begin, int64_t end);

// Work item = one (token, head) row over q's heads then k's: r = n * (q_heads + k_heads) + h.
// q [N, q_heads, D], k [N, k_heads, D] (unit stride along D), cos/sin [N, D] (row stride
// cs_stride); q_out, k_out contiguous.
struct RotaryArgs {
  const void* q;
  const void* k;
  const void* cos;
  const void* sin;
  void* q_out;
  void* k_out;
  int64_t q_stride_n, q_stride_h, k_stride_n, k_stride_h, cs_stride;
  int64_t q_heads, k_heads, head_dim;
};

void rotary(Dtype dtype, const RotaryArgs& args, int64_t begin, int64_t end);

}  // namespace rlvr_fast::cpu
