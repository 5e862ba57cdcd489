// Small per-token ops of a Llama decoder layer, fused: each is one pass over its rows instead of the
// 5-8 PyTorch ops (and temporaries) of the model's plain code. At decode batch sizes every op costs
// a few microseconds of dispatch whatever its size, so on a CPU the op count is what matters.
//
// Both reproduce the rounding of the PyTorch code they replace (rlvr_fast/model/llama.py), so that
// bf16 results agree bit for bit except where a float32 sum is taken in another order:
//
//   rms_norm: out = weight * to_dtype(x_f32 * rsqrt(mean(x_f32^2) + eps))      (product in x's dtype)
//   rotary:   out = x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), every product and
//             the sum rounded to x's dtype (no fused multiply-add: see the pragmas below).
#include <cmath>

#include "kernels.h"
#include "simd.h"

// The rotary products must be rounded separately, like PyTorch's two multiplies and an add;
// a fused multiply-add would round once and differ in the last bit.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace rlvr_fast::cpu {
namespace {

template <class E>
RLVR_INLINE void rms_norm_rows(const RmsNormArgs& a, int64_t begin, int64_t end) {
  using T = typename E::raw;
  const int64_t H = a.hidden;
  const T* w = static_cast<const T*>(a.weight);
  for (int64_t r = begin; r < end; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.x_stride;
    T* out = static_cast<T*>(a.out) + r * H;
    float sumsq = 0.0f;
#pragma omp simd reduction(+ : sumsq)
    for (int64_t i = 0; i < H; ++i) {
      const float v = E::load(x[i]);
      sumsq += v * v;
    }
    const float inv = 1.0f / std::sqrt(sumsq / float(H) + a.eps);
#pragma omp simd
    for (int64_t i = 0; i < H; ++i) {
      const float normed = E::load(E::store(E::load(x[i]) * inv));  // .to(x.dtype)
      out[i] = E::store(E::load(w[i]) * normed);
    }
  }
}

template <class E>
RLVR_INLINE void rotary_rows(const RotaryArgs& a, int64_t begin, int64_t end) {
  using T = typename E::raw;
  const int64_t D = a.head_dim, half = D / 2;
  // Row r of the work is (token n, head h) over q's heads then k's.
  for (int64_t r = begin; r < end; ++r) {
    const int64_t n = r / (a.q_heads + a.k_heads), h = r % (a.q_heads + a.k_heads);
    const bool is_q = h < a.q_heads;
    const int64_t hh = is_q ? h : h - a.q_heads;
    const T* x = static_cast<const T*>(is_q ? a.q : a.k) + n * (is_q ? a.q_stride_n : a.k_stride_n) +
                 hh * (is_q ? a.q_stride_h : a.k_stride_h);
    T* out = static_cast<T*>(is_q ? a.q_out : a.k_out) + (n * (is_q ? a.q_heads : a.k_heads) + hh) * D;
    const T* c = static_cast<const T*>(a.cos) + n * a.cs_stride;
    const T* s = static_cast<const T*>(a.sin) + n * a.cs_stride;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = E::load(x[i]), x2 = E::load(x[i + half]);
      const float lo_c = E::load(E::store(x1 * E::load(c[i])));
      const float lo_s = E::load(E::store(-x2 * E::load(s[i])));
      const float hi_c = E::load(E::store(x2 * E::load(c[i + half])));
      const float hi_s = E::load(E::store(x1 * E::load(s[i + half])));
      out[i] = E::store(lo_c + lo_s);
      out[i + half] = E::store(hi_c + hi_s);
    }
  }
}

RLVR_MULTIVERSION void rms_norm_f32(const RmsNormArgs& a, int64_t b, int64_t e) { rms_norm_rows<F32>(a, b, e); }
RLVR_MULTIVERSION void rms_norm_bf16(const RmsNormArgs& a, int64_t b, int64_t e) { rms_norm_rows<Bf16>(a, b, e); }
RLVR_MULTIVERSION void rms_norm_f16(const RmsNormArgs& a, int64_t b, int64_t e) { rms_norm_rows<F16>(a, b, e); }
RLVR_MULTIVERSION void rotary_f32(const RotaryArgs& a, int64_t b, int64_t e) { rotary_rows<F32>(a, b, e); }
RLVR_MULTIVERSION void rotary_bf16(const RotaryArgs& a, int64_t b, int64_t e) { rotary_rows<Bf16>(a, b, e); }
RLVR_MULTIVERSION void rotary_f16(const RotaryArgs& a, int64_t b, int64_t e) { rotary_rows<F16>(a, b, e); }

}  // namespace

void rms_norm(Dtype dtype, const RmsNormArgs& args, int64_t begin, int64_t end) {
  switch (dtype) {
    case Dtype::f32: return rms_norm_f32(args, begin, end);
    case Dtype::bf16: return rms_norm_bf16(args, begin, end);
    case Dtype::f16: return rms_norm_f16(args, begin, end);
  }
}

void rotary(Dtype dtype, const RotaryArgs& args, int64_t begin, int64_t end) {
  switch (dtype) {
    case Dtype::f32: return rotary_f32(args, begin, end);
    case Dtype::bf16: return rotary_bf16(args, begin, end);
    case Dtype::f16: return rotary_f16(args, begin, end);
  }
}

}  // namespace rlvr_fast::cpu
