// Decode attention over a paged KV cache, one (sequence, kv head) pair per work item.
//
//   out[b, h] = sum_j softmax_j(q[b, h] . K_b[j] * scale) V_b[j],   0 <= j < context_lens[b]
//
// The G query heads that share a kv head are processed together, so each cached K/V row is
// fetched from memory once per item and stays in L1 while the G heads use it. All arithmetic is
// fp32 whatever the storage type. The context is walked in chunks of up to 128 tokens: scores for
// the whole chunk, one online-softmax step per head (running max m, normalizer l, accumulator
// rescaled by exp(m_old - m_new)), then the chunk's V rows into the accumulator. A context
// length of 0 writes zeros (the Triton kernel's contract for CUDA-graph padding rows).
//
// Two code paths:
// * head_dim 64 or 128 (every model this project targets), GCC >= 12 or Clang: explicit vectors
//   of W floats (simd.h), W = the register width of the CPU it runs on (16 AVX-512, 8 AVX2,
//   4 otherwise). W tokens' dot products are reduced together by one transpose-reduce (W - 1
//   two-vector folds) instead of W horizontal sums; a head's accumulator stays in registers while
//   the chunk's V rows stream through; bf16 rows are read in place as pairs (load_bf16_pairs),
//   so q, K, V and the accumulator live in that pair lane order until the output is stored.
// * anything else: plain loops under `#pragma omp simd`, a widened fp32 copy of each row.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace rlvr_fast::cpu {
namespace {

constexpr int64_t kChunk = 128;  // tokens per online-softmax step
constexpr int64_t kTile = 16;    // tokens per score step in the generic path
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Online-softmax step for one head over n scores s (in: scores, out: weights); returns alpha, the
// factor that rescales what was accumulated before.
RLVR_INLINE float softmax_step(float* __restrict s, int64_t n, float& m, float& l) {
  float step_max = kNegInf;
#pragma omp simd reduction(max : step_max)
  for (int64_t t = 0; t < n; ++t) step_max = s[t] > step_max ? s[t] : step_max;
  const float m_new = std::max(m, step_max);
  const float alpha = fast_exp(m - m_new);  // 0 on the first step (m = -inf)
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < n; ++t) {
    const float p = fast_exp(s[t] - m_new);
    s[t] = p;
    sum += p;
  }
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

template <class E>
RLVR_INLINE void store_output(const AttentionArgs& a, int64_t b, int64_t h, float* acc, const float* l, int64_t D) {
  using T = typename E::raw;
  T* ob = static_cast<T*>(a.out) + b * a.out_stride_b + h * a.groups * a.out_stride_h;
  for (int64_t g = 0; g < a.groups; ++g) {
    const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;  // ctx == 0: acc is 0, output 0
    float* ag = acc + g * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) ag[d] *= inv;
    store_row<E>(ag, ob + g * a.out_stride_h, D);
  }
}

// Cache offset (elements) of the row of token `pos` of the sequence with block table `table`, kv head h.
RLVR_INLINE int64_t row_offset(const AttentionArgs& a, const int32_t* table, int64_t pos, int64_t h) {
  return int64_t(table[pos / a.block_size]) * a.cache_stride_block + (pos % a.block_size) * a.cache_stride_slot +
         h * a.cache_stride_head;
}

#ifdef RLVR_HAVE_VEC
// Row pointers as the vector path reads them: bf16 in place, float in place, float16 widened copies.
template <class E>
using RowPtr = std::conditional_t<std::is_same_v<E, Bf16>, const uint16_t*, const float*>;

// A row of D = W * ND values as ND vectors in the kernel's lane order.
template <class E, int W, int ND>
RLVR_INLINE void row_vecs(RowPtr<E> row, vf<W>* v) {
  if constexpr (std::is_same_v<E, Bf16>) {
    static_assert(ND % 2 == 0, "bf16 rows are read 2W values at a time");
    for (int c = 0; c < ND / 2; ++c) load_bf16_pairs<W>(row + 2 * W * c, v[2 * c], v[2 * c + 1]);
  } else {
    for (int c = 0; c < ND; ++c) v[c] = loadv<W>(row + W * c);
  }
}

template <class E, int W, int ND>
RLVR_INLINE void attention_vec(const AttentionArgs& a, int64_t begin, int64_t end) {
  using T = typename E::raw;
  constexpr bool kPairs = std::is_same_v<E, Bf16>;  // bf16: pair lane order
  constexpr bool kWiden = !E::is_float && !kPairs;  // float16: rows widened into scratch
  constexpr int64_t D = W * ND;
  const int64_t G = a.groups;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  const int64_t widened = kWiden ? 2 * kChunk * D : 0;
  std::vector<float> scratch(static_cast<size_t>(2 * G * D + G * kChunk + 3 * G + widened + D));
  float* qf = scratch.data();   // [G, D] scaled queries (kernel lane order)
  float* acc = qf + G * D;      // [G, D] (kernel lane order)
  float* s = acc + G * D;       // [G, kChunk] scores, then weights
  float* m = s + G * kChunk;    // [G] running max
  float* l = m + G;             // [G] running normalizer
  float* alpha = l + G;         // [G] rescaling of acc for the current chunk
  float* tmp = alpha + G;       // [D]
  float* kf = tmp + D;          // [kChunk, D] widened K rows (float16)
  float* vf_rows = kf + kChunk * D;  // [kChunk, D] widened V rows (float16)
  int64_t off[kChunk];
  RowPtr<E> krows[kChunk];
  RowPtr<E> vrows[kChunk];

  auto row = [&](const T* cache, int64_t offset, float* widen_to) -> RowPtr<E> {
    if constexpr (kWiden) {
      load_row<E>(cache + offset, widen_to, D);
      return widen_to;
    } else {
      return reinterpret_cast<RowPtr<E>>(cache + offset);
    }
  };

  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / a.kv_heads, h = item % a.kv_heads;
    const int64_t ctx = a.context_lens[b];
    const int32_t* table = a.block_tables + b * a.table_stride;
    const T* qb = static_cast<const T*>(a.q) + b * a.q_stride_b + h * G * a.q_stride_h;
    for (int64_t g = 0; g < G; ++g) {
      vf<W> qv[ND];
      if constexpr (kPairs) {
        row_vecs<E, W, ND>(qb + g * a.q_stride_h, qv);
      } else {
        load_row<E>(qb + g * a.q_stride_h, tmp, D);
        row_vecs<F32, W, ND>(tmp, qv);
      }
      for (int c = 0; c < ND; ++c) storev<W>(qf + g * D + W * c, qv[c] * a.scale);
      m[g] = kNegInf;
      l[g] = 0.0f;
    }
    std::fill(acc, acc + G * D, 0.0f);

    for (int64_t c0 = 0; c0 < ctx; c0 += kChunk) {
      const int64_t nc = std::min(kChunk, ctx - c0);
      const int64_t padded = (nc + W - 1) / W * W;
      // Rows past the context repeat the chunk's first row; their scores are masked below.
      for (int64_t t = 0; t < padded; ++t) {
        off[t] = row_offset(a, table, c0 + (t < nc ? t : 0), h);
        krows[t] = t < nc || !kWiden ? row(kc, off[t], kf + t * D) : krows[0];
      }
      // Scores, W tokens at a time: per head W partial-product vectors, one transpose-reduce.
      for (int64_t t0 = 0; t0 < padded; t0 += W) {
        for (int64_t g = 0; g < G; ++g) {
          vf<W> qv[ND];
          for (int c = 0; c < ND; ++c) qv[c] = loadv<W>(qf + g * D + W * c);
          vf<W> part[W];
          for (int64_t t = 0; t < W; ++t) {
            vf<W> kv[ND];
            row_vecs<E, W, ND>(krows[t0 + t], kv);
            vf<W> p = qv[0] * kv[0];
            for (int c = 1; c < ND; ++c) p += qv[c] * kv[c];
            part[t] = p;
          }
          storev<W>(s + g * kChunk + t0, transpose_reduce(part));
        }
      }
      // One online-softmax step per head for the whole chunk.
      for (int64_t g = 0; g < G; ++g) alpha[g] = softmax_step(s + g * kChunk, nc, m[g], l[g]);
      // acc[g] = alpha * acc[g] + sum_t p[g, t] v_t, the accumulator in registers.
      for (int64_t t = 0; t < nc; ++t) vrows[t] = row(vc, off[t], vf_rows + t * D);
      for (int64_t g = 0; g < G; ++g) {
        const float* sg = s + g * kChunk;
        vf<W> av[ND];
        for (int c = 0; c < ND; ++c) av[c] = loadv<W>(acc + g * D + W * c) * alpha[g];
        for (int64_t t = 0; t < nc; ++t) {
          const float p = sg[t];
          vf<W> vv[ND];
          row_vecs<E, W, ND>(vrows[t], vv);
          for (int c = 0; c < ND; ++c) av[c] += p * vv[c];
        }
        for (int c = 0; c < ND; ++c) storev<W>(acc + g * D + W * c, av[c]);
      }
    }
    // bf16: back to element order (lane j of vector 2c is element 2Wc + 2j, of vector 2c + 1 element 2Wc + 2j + 1).
    if constexpr (kPairs) {
      for (int64_t g = 0; g < G; ++g) {
        float* ag = acc + g * D;
        for (int64_t c = 0; c < ND / 2; ++c)
          for (int64_t j = 0; j < W; ++j) {
            tmp[2 * W * c + 2 * j] = ag[2 * W * c + j];
            tmp[2 * W * c + 2 * j + 1] = ag[2 * W * c + W + j];
          }
        std::memcpy(ag, tmp, sizeof(float) * D);
      }
    }
    store_output<E>(a, b, h, acc, l, D);
  }
}
#endif

// Any head_dim: per-row loops left to the compiler's vectoriser.
template <class E>
RLVR_INLINE void attention_generic(const AttentionArgs& a, int64_t begin, int64_t end) {
  using T = typename E::raw;
  const int64_t G = a.groups, D = a.head_dim;
  const T* kc = static_cast<const T*>(a.k_cache);
  const T* vc = static_cast<const T*>(a.v_cache);
  std::vector<float> scratch(static_cast<size_t>(2 * G * D + G * kTile + 2 * G + D));
  float* qf = scratch.data();  // [G, D]
  float* acc = qf + G * D;     // [G, D]
  float* s = acc + G * D;      // [G, kTile]
  float* m = s + G * kTile;    // [G]
  float* l = m + G;            // [G]
  float* row = l + G;          // [D] one widened K or V row
  for (int64_t item = begin; item < end; ++item) {
    const int64_t b = item / a.kv_heads, h = item % a.kv_heads;
    const int64_t ctx = a.context_lens[b];
    const int32_t* table = a.block_tables + b * a.table_stride;
    const T* qb = static_cast<const T*>(a.q) + b * a.q_stride_b + h * G * a.q_stride_h;
    for (int64_t g = 0; g < G; ++g) {
      const T* qg = qb + g * a.q_stride_h;
      float* qfg = qf + g * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) qfg[d] = E::load(qg[d]) * a.scale;
      m[g] = kNegInf;
      l[g] = 0.0f;
    }
    std::fill(acc, acc + G * D, 0.0f);
    for (int64_t t0 = 0; t0 < ctx; t0 += kTile) {
      const int64_t n = std::min(kTile, ctx - t0);
      for (int64_t t = 0; t < n; ++t) {
        load_row<E>(kc + row_offset(a, table, t0 + t, h), row, D);
        for (int64_t g = 0; g < G; ++g) s[g * kTile + t] = dot(qf + g * D, row, D);
      }
      for (int64_t g = 0; g < G; ++g) {
        const float alpha = softmax_step(s + g * kTile, n, m[g], l[g]);
        float* ag = acc + g * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ag[d] *= alpha;
      }
      for (int64_t t = 0; t < n; ++t) {
        load_row<E>(vc + row_offset(a, table, t0 + t, h), row, D);
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * kTile + t];
          float* __restrict ag = acc + g * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ag[d] += p * row[d];
        }
      }
    }
    store_output<E>(a, b, h, acc, l, D);
  }
}

// Vector path for W-float registers where the head size allows, else the generic one.
template <class E, int W>
RLVR_INLINE void attention_items(const AttentionArgs& a, int64_t begin, int64_t end) {
#ifdef RLVR_HAVE_VEC
  switch (a.head_dim) {
    case 64: return attention_vec<E, W, 64 / W>(a, begin, end);    // SmolLM2, Llama 3.2 1B/3B
    case 128: return attention_vec<E, W, 128 / W>(a, begin, end);  // Llama 2/3.x 7B+, Qwen
    default: break;
  }
#endif
  attention_generic<E>(a, begin, end);
}

template <class E>
void attention_baseline(const AttentionArgs& a, int64_t begin, int64_t end) {
  attention_items<E, 4>(a, begin, end);  // SSE2 / NEON registers: 4 floats
}

#ifdef RLVR_X86_LEVELS
template <class E>
RLVR_TARGET_AVX2 void attention_avx2(const AttentionArgs& a, int64_t begin, int64_t end) {
  attention_items<E, 8>(a, begin, end);
}

template <class E>
RLVR_TARGET_AVX512 void attention_avx512(const AttentionArgs& a, int64_t begin, int64_t end) {
  attention_items<E, 16>(a, begin, end);
}
#endif

template <class E>
void attention_dispatch(const AttentionArgs& a, int64_t begin, int64_t end) {
#ifdef RLVR_X86_LEVELS
  switch (cpu_level()) {
    case CpuLevel::avx512: return attention_avx512<E>(a, begin, end);
    case CpuLevel::avx2: return attention_avx2<E>(a, begin, end);
    case CpuLevel::baseline: break;
  }
#endif
  attention_baseline<E>(a, begin, end);
}

}  // namespace

void paged_attention(Dtype dtype, const AttentionArgs& args, int64_t begin, int64_t end) {
  switch (dtype) {
    case Dtype::f32: return attention_dispatch<F32>(args, begin, end);
    case Dtype::bf16: return attention_dispatch<Bf16>(args, begin, end);
    case Dtype::f16: return attention_dispatch<F16>(args, begin, end);
  }
}

}  // namespace rlvr_fast::cpu
