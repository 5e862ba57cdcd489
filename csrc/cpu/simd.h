// Scalar helpers that GCC/Clang vectorise inside `#pragma omp simd` loops, and the per-ISA cloning
// macro. No torch headers here: the kernel files that include this compile in about a second.
//
// * Element types: float, bfloat16 and float16 stored as raw 16-bit patterns (Bf16 / F16 below);
//   loads widen to float (exact), stores round to nearest even (like c10::BFloat16 / c10::Half).
// * fast_exp: exp(x) with a Cephes-style polynomial, <= 2 ulp on [-87.3, 88.7], 0 below -87.3
//   (where exp(x) < FLT_MIN: softmax and sampling weights that small are zero for all purposes).
//   Plain arithmetic only, so a loop of it vectorises; libm's expf would not.
// * RLVR_MULTIVERSION: on x86-64 Linux with GCC >= 11, clones a function for x86-64-v4 (AVX-512),
//   x86-64-v3 (AVX2 + FMA) and the baseline, picked once at load time by the CPU (an ifunc): for
//   loops the compiler vectorises itself. Kernels written with explicit vectors (vf<W>) instead
//   are instantiated per register width and picked by cpu_level() (RLVR_TARGET_*). Either way the
//   .so runs on any x86-64 and uses the widest vectors the machine has; no -march flag is needed
//   at build time. Elsewhere (aarch64: NEON is baseline) both expand to the baseline.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#define RLVR_INLINE inline __attribute__((always_inline))

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11 && \
    !defined(RLVR_FAST_NO_MULTIVERSION)
#define RLVR_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define RLVR_MULTIVERSION
#endif

namespace rlvr_fast::cpu {

RLVR_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

RLVR_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Element types. `raw` is the storage type; load() widens to float; store() rounds from float.
struct F32 {
  using raw = float;
  static constexpr bool is_float = true;
  static RLVR_INLINE float load(float x) { return x; }
  static RLVR_INLINE float store(float x) { return x; }
};

struct Bf16 {
  using raw = uint16_t;
  static constexpr bool is_float = false;
  static RLVR_INLINE float load(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
  static RLVR_INLINE uint16_t store(float f) {
    uint32_t u = float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);                       // round to nearest, ties to even
    return uint16_t(u >> 16);
  }
};

struct F16 {
  using raw = uint16_t;
  static constexpr bool is_float = false;
  static RLVR_INLINE float load(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t em = h & 0x7fffu;
    // Exponent and mantissa moved into float position and rebiased by 2^112: exact for normals
    // and subnormals; infinities and NaNs get the all-ones float exponent.
    float f = bits_to_float(em << 13) * 0x1p112f;
    if (em >= 0x7c00u) f = bits_to_float((em << 13) | 0x7f800000u);
    return bits_to_float(float_to_bits(f) | sign);
  }
  static RLVR_INLINE uint16_t store(float f) {
    uint32_t x = float_to_bits(f);
    const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00;     // NaN
    if (x >= 0x477ff000u) return sign | 0x7c00;    // rounds to infinity (|f| >= 65520)
    if (x < 0x38800000u) {                         // half subnormal or zero: |f| < 2^-14
      // Adding 0.5 lines the half-subnormal unit (2^-24) up with float's last mantissa bit at
      // 0.5, so the FPU does the round-to-nearest-even; the low bits are the half's mantissa.
      const float t = bits_to_float(x) + 0.5f;
      return sign | uint16_t(float_to_bits(t) - 0x3f000000u);
    }
    x += 0xc8000fffu + ((x >> 13) & 1u);           // rebias exponent (-112), round to nearest even
    return sign | uint16_t(x >> 13);
  }
};

// exp(x): n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), exp(r) by a degree-6 polynomial,
// times 2^n built in the exponent bits. Inputs below -87.33 (including -inf) give 0.
RLVR_INLINE float fast_exp(float x) {
  const float lo = -87.33f, hi = 88.7f;
  const bool tiny = x < lo;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  // Round-to-nearest-integer via the 1.5 * 2^23 trick (valid for |t| < 2^22, no -ffast-math here).
  const float t = x * 1.44269504088896341f;
  const float n = (t + 12582912.0f) - 12582912.0f;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * (r * r) + r + 1.0f;
  const float scale = bits_to_float(uint32_t(int32_t(n) + 127) << 23);
  return tiny ? 0.0f : y * scale;
}

// Widen n elements to float (a copy for float itself; callers avoid it where they can).
template <class E>
RLVR_INLINE void load_row(const typename E::raw* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = E::load(src[i]);
}

template <class E>
RLVR_INLINE void store_row(const float* __restrict src, typename E::raw* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = E::store(src[i]);
}

RLVR_INLINE float dot(const float* __restrict a, const float* __restrict b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// ------------------------------------------------------------------ explicit vectors of W floats
// GCC/Clang vector extensions, used where auto-vectorisation needs help (horizontal reductions,
// accumulators kept in registers: decode attention). W is the machine's register width: 16 floats
// with AVX-512, 8 with AVX2, 4 with SSE2 / NEON; a kernel is instantiated per W and the caller
// picks one per CPU (RLVR_TARGET_* below), since a vector wider than the registers spills.
#if (defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)) && !defined(RLVR_FAST_NO_VECTOR_EXT)
#define RLVR_HAVE_VEC 1

template <int W>
struct VecTypes;
template <>
struct VecTypes<4> {
  typedef float f __attribute__((vector_size(16)));
  typedef uint32_t u __attribute__((vector_size(16)));
};
template <>
struct VecTypes<8> {
  typedef float f __attribute__((vector_size(32)));
  typedef uint32_t u __attribute__((vector_size(32)));
};
template <>
struct VecTypes<16> {
  typedef float f __attribute__((vector_size(64)));
  typedef uint32_t u __attribute__((vector_size(64)));
};
template <int W>
using vf = typename VecTypes<W>::f;
template <int W>
using vu = typename VecTypes<W>::u;

template <int W>
RLVR_INLINE vf<W> loadv(const float* p) {
  vf<W> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <int W>
RLVR_INLINE void storev(float* p, vf<W> v) {
  std::memcpy(p, &v, sizeof v);
}

// 2W bf16 values read as W 32-bit lanes of two values each: the even element is the lane shifted
// up 16 bits, the odd one the lane with its low 16 bits cleared (two instructions, no widening
// shuffles). Lane j of `even` is element 2j, of `odd` element 2j + 1.
template <int W>
RLVR_INLINE void load_bf16_pairs(const uint16_t* p, vf<W>& even, vf<W>& odd) {
  vu<W> w;
  std::memcpy(&w, p, sizeof w);
  even = (vf<W>)(w << 16);
  odd = (vf<W>)(w & 0xffff0000u);
}

// out[t] = sum of the W lanes of p[t], for W vectors at once. Pairwise folds: two vectors holding
// groups of w lanes (one group per input vector) give one vector of groups of w / 2 lanes, the
// groups of the first operand then of the second, each lane the sum of two lanes of its group.
// W - 1 folds of two shuffles and an add, instead of W separate horizontal sums.
RLVR_INLINE vf<16> transpose_reduce(const vf<16>* p) {
  vf<16> q[8], r[4], s[2];
  for (int i = 0; i < 8; ++i) {
    const vf<16> a = p[2 * i], b = p[2 * i + 1];
    q[i] = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  }
  for (int i = 0; i < 4; ++i)
    r[i] = __builtin_shufflevector(q[2 * i], q[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(q[2 * i], q[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)
    s[i] = __builtin_shufflevector(r[2 * i], r[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(r[2 * i], r[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(s[0], s[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(s[0], s[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

RLVR_INLINE vf<8> transpose_reduce(const vf<8>* p) {
  vf<8> q[4], r[2];
  for (int i = 0; i < 4; ++i)
    q[i] = __builtin_shufflevector(p[2 * i], p[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(p[2 * i], p[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15);
  for (int i = 0; i < 2; ++i)
    r[i] = __builtin_shufflevector(q[2 * i], q[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13) +
           __builtin_shufflevector(q[2 * i], q[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15);
  return __builtin_shufflevector(r[0], r[1], 0, 2, 4, 6, 8, 10, 12, 14) +
         __builtin_shufflevector(r[0], r[1], 1, 3, 5, 7, 9, 11, 13, 15);
}

RLVR_INLINE vf<4> transpose_reduce(const vf<4>* p) {
  const vf<4> q0 = __builtin_shufflevector(p[0], p[1], 0, 1, 4, 5) + __builtin_shufflevector(p[0], p[1], 2, 3, 6, 7);
  const vf<4> q1 = __builtin_shufflevector(p[2], p[3], 0, 1, 4, 5) + __builtin_shufflevector(p[2], p[3], 2, 3, 6, 7);
  return __builtin_shufflevector(q0, q1, 0, 2, 4, 6) + __builtin_shufflevector(q0, q1, 1, 3, 5, 7);
}
#endif

// Per-ISA entry points for kernels written with vf<W> (x86-64 with GCC/Clang): the same template
// instantiated with W = 16 inside an AVX-512 function, W = 8 inside an AVX2 function and W = 4 in
// the baseline, chosen at run time by cpu_level().
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(RLVR_FAST_NO_MULTIVERSION)
#define RLVR_X86_LEVELS 1
#define RLVR_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2")))
#define RLVR_TARGET_AVX2 __attribute__((target("avx2,fma,f16c,bmi,bmi2")))

enum class CpuLevel { baseline, avx2, avx512 };

// The CPU's level, lowered (never raised) by RLVR_FAST_CPU_LEVEL=avx2|baseline: lets the tests run the
// narrower code paths on a wider machine.
inline CpuLevel cpu_level() {
  static const CpuLevel level = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    CpuLevel found = CpuLevel::baseline;
    if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      found = CpuLevel::avx512;
    else if (avx2)
      found = CpuLevel::avx2;
    const char* cap = std::getenv("RLVR_FAST_CPU_LEVEL");
    const CpuLevel limit = cap == nullptr                           ? CpuLevel::avx512
                           : std::strcmp(cap, "baseline") == 0      ? CpuLevel::baseline
                           : std::strcmp(cap, "avx2") == 0          ? CpuLevel::avx2
                                                                    : CpuLevel::avx512;
    return std::min(found, limit);
  }();
  return level;
}
#endif

}  // namespace rlvr_fast::cpu
