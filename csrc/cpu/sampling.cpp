// Fused sampling, one row of logits per work item: the token and log_softmax(logits / T) at it.
//
// The method is exactly the PyTorch reference's (kernels/paged_reference.py: sample_ref), so that
// for the same keys both pick the same token except when the uniform lands within float rounding
// of a boundary of the cumulative distribution (about 1e-7 of a draw):
//
//   z = float(x) * float(1 / T); greedy (T = 0): z = float(x), token = argmax, first index on ties
//   (a NaN wins, like torch.argmax).
//   weights e_i = exp(z_i - max z), zeroed outside top-k (ties at the k-th value kept) and top-p
//   (the shortest run of most likely tokens whose mass reaches top_p, at least one).
//   u = ((key & (2^52 - 1)) + 0.5) * 2^-52;  token = first i with cumsum(e)[i] > u * sum(e),
//   searched in two levels: float64 sums of 256-token chunks and their running sum, then a
//   float64 cumulative sum inside the one chunk that holds the token. The target is kept just
//   below the total (and the in-chunk remainder below the chunk's sum), so the token found
//   always has positive weight.
//   logprob = z[token] - logsumexp(z) over the full vocabulary, filtered or not.
//
// Top-p needs the most likely tokens in order. Instead of sorting the vocabulary, candidates
// are taken above a falling threshold max z - delta until their mass reaches top_p, and only
// those are sorted (by z descending, then index): the nucleus is always inside that set.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace rlvr_fast::cpu {
namespace {

constexpr int64_t kChunk = 256;

// sum_i exp(z_i - shift), fp32 within 256-element chunks, float64 across them.
RLVR_INLINE double sum_exp(const float* __restrict z, int64_t n, float shift) {
  double total = 0.0;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    float part = 0.0f;
#pragma omp simd reduction(+ : part)
    for (int64_t i = c0; i < c1; ++i) part += fast_exp(z[i] - shift);
    total += part;
  }
  return total;
}

// Keep only the top-p nucleus of the weights e (tokens with e = 0 are already excluded):
// zero every other entry. `order` is scratch of at least n ints.
RLVR_INLINE void top_p_filter(const float* __restrict z, float* __restrict e, int64_t n, float zmax, double top_p,
                              std::vector<int32_t>& order) {
  double mass = 0.0;
  for (int64_t i = 0; i < n; ++i) mass += e[i];
  const double target = top_p * mass;
  // Candidates above a falling threshold until they hold at least top_p of the mass.
  int64_t count = 0;
  for (float delta = 8.0f;; delta *= 2.0f) {
    const float floor_z = zmax - delta;
    double got = 0.0;
    count = 0;
    for (int64_t i = 0; i < n; ++i) {
      if (e[i] > 0.0f && z[i] >= floor_z) {
        order[count++] = int32_t(i);
        got += e[i];
      }
    }
    if (got >= target || delta > 1e30f || !(floor_z > -std::numeric_limits<float>::infinity())) break;
  }
  std::sort(order.begin(), order.begin() + count, [z](int32_t a, int32_t b) {
    return z[a] > z[b] || (z[a] == z[b] && a < b);
  });
  // Keep j while the mass of strictly more likely tokens is below top_p (always the first one).
  double before = 0.0;
  int64_t keep = 0;
  while (keep < count && (keep == 0 || before < target)) before += e[order[keep++]];
  // Zero everything, then put the kept weights back.
  std::vector<float> kept(static_cast<size_t>(keep));
  for (int64_t j = 0; j < keep; ++j) kept[j] = e[order[j]];
  std::fill(e, e + n, 0.0f);
  for (int64_t j = 0; j < keep; ++j) e[order[j]] = kept[j];
}

// First i with cumsum(e)[i] > u * sum(e) (two-level, float64); also returns sum(e).
RLVR_INLINE int64_t inverse_cdf(const float* __restrict e, int64_t n, double u, double* total_out,
                                std::vector<double>& running) {
  const int64_t nchunks = (n + kChunk - 1) / kChunk;
  double total = 0.0;
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t c0 = c * kChunk, c1 = std::min(n, c0 + kChunk);
    double part = 0.0;
#pragma omp simd reduction(+ : part)
    for (int64_t i = c0; i < c1; ++i) part += double(e[i]);
    total += part;
    running[c] = total;
  }
  *total_out = total;
  const double target = std::min(u * total, total * (1.0 - 0x1p-40));
  const int64_t ci = std::min<int64_t>(
      std::upper_bound(running.begin(), running.begin() + nchunks, target) - running.begin(), nchunks - 1);
  const double before = ci > 0 ? running[ci - 1] : 0.0;
  const int64_t c0 = ci * kChunk, c1 = std::min(n, c0 + kChunk);
  double chunk_sum = 0.0;
  for (int64_t i = c0; i < c1; ++i) chunk_sum += double(e[i]);
  const double rest = std::min(target - before, chunk_sum * (1.0 - 0x1p-40));
  double cum = 0.0;
  for (int64_t i = c0; i < c1; ++i) {
    cum += double(e[i]);
    if (cum > rest) return i;
  }
  return c1 - 1;
}

template <class E>
RLVR_INLINE void sample_rows(const SampleArgs& a, int64_t begin, int64_t end) {
  using T = typename E::raw;
  const int64_t V = a.vocab;
  const bool greedy = a.temperature == 0.0;
  const bool use_top_k = a.top_k > 0 && a.top_k < V;
  const bool use_top_p = a.top_p < 1.0;
  const bool filtered = !greedy && (a.top_k > 0 || use_top_p);
  const float inv_t = greedy ? 1.0f : float(1.0 / a.temperature);
  std::vector<float> z(static_cast<size_t>(V)), e(greedy ? 0 : static_cast<size_t>(V));
  std::vector<double> running(static_cast<size_t>((V + kChunk - 1) / kChunk));
  std::vector<int32_t> order(use_top_p && !greedy ? static_cast<size_t>(V) : 0);

  for (int64_t row = begin; row < end; ++row) {
    const T* x = static_cast<const T*>(a.logits) + row * a.row_stride;
    float* zr = z.data();
    float zmax = -std::numeric_limits<float>::infinity();
    int32_t nans = 0;  // 32-bit: the counter shares the float lanes' width
#pragma omp simd reduction(max : zmax) reduction(+ : nans)
    for (int64_t i = 0; i < V; ++i) {
      const float v = E::load(x[i]) * inv_t;  // inv_t == 1 for greedy: exact
      zr[i] = v;
      zmax = v > zmax ? v : zmax;
      nans += v != v;
    }
    int64_t token = 0;
    float lse;
    if (nans > 0) {  // torch.argmax semantics: the first NaN; log-prob NaN
      while (!(zr[token] != zr[token])) ++token;
      lse = std::numeric_limits<float>::quiet_NaN();
    } else if (greedy) {  // the first index holding the max: find its 16-wide group, then the lane
      for (; token + 16 <= V; token += 16) {
        int32_t hit = 0;
#pragma omp simd reduction(| : hit)
        for (int64_t j = 0; j < 16; ++j) hit |= zr[token + j] == zmax;
        if (hit) break;
      }
      while (token < V - 1 && zr[token] != zmax) ++token;
      lse = zmax + float(std::log(sum_exp(zr, V, zmax)));
    } else {
      float* er = e.data();
#pragma omp simd
      for (int64_t i = 0; i < V; ++i) er[i] = fast_exp(zr[i] - zmax);
      if (use_top_k) {
        // k-th largest z; everything below it is out (ties at the k-th value stay in).
        std::vector<float> tmp(zr, zr + V);
        std::nth_element(tmp.begin(), tmp.begin() + (a.top_k - 1), tmp.end(), std::greater<float>());
        const float kth = tmp[size_t(a.top_k - 1)];
#pragma omp simd
        for (int64_t i = 0; i < V; ++i) er[i] = zr[i] < kth ? 0.0f : er[i];
      }
      if (use_top_p) top_p_filter(zr, er, V, zmax, a.top_p, order);
      const uint64_t key = uint64_t(a.keys[row]);
      const double u = (double(key & ((uint64_t(1) << 52) - 1)) + 0.5) * 0x1p-52;
      double total = 0.0;
      token = inverse_cdf(er, V, u, &total, running);
      lse = filtered ? zmax + float(std::log(sum_exp(zr, V, zmax))) : zmax + float(std::log(total));
    }
    a.tokens[row] = token;
    a.logprobs[row] = zr[token] - lse;
  }
}

RLVR_MULTIVERSION void sample_f32(const SampleArgs& a, int64_t b, int64_t e) { sample_rows<F32>(a, b, e); }
RLVR_MULTIVERSION void sample_bf16(const SampleArgs& a, int64_t b, int64_t e) { sample_rows<Bf16>(a, b, e); }
RLVR_MULTIVERSION void sample_f16(const SampleArgs& a, int64_t b, int64_t e) { sample_rows<F16>(a, b, e); }

}  // namespace

void sample(Dtype dtype, const SampleArgs& args, int64_t begin, int64_t end) {
  switch (dtype) {
    case Dtype::f32: return sample_f32(args, begin, end);
    case Dtype::bf16: return sample_bf16(args, begin, end);
    case Dtype::f16: return sample_f16(args, begin, end);
  }
}

}  // namespace rlvr_fast::cpu
