// rlvr_fast._C: the rollout ops' schemas (torch.ops.rlvr_fast.*) and their CPU implementations.
//
// Schemas are defined here, once. The CPU kernels (csrc/cpu/*.cpp, plain C++ on raw pointers)
// are registered for the CPU dispatch key below, the only one: on CUDA tensors kernels/paged_kv.py,
// paged_attention.py and sampling.py launch their Triton kernels directly, not through these ops.
//
// This file checks shapes, dtypes, devices and index ranges, allocates outputs and splits the
// work with at::parallel_for (OpenMP: the same thread pool as torch's own ops).
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

#include "cpu/kernels.h"

namespace rlvr_fast {
namespace {

cpu::Dtype kernel_dtype(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return cpu::Dtype::f32;
    case at::kBFloat16: return cpu::Dtype::bf16;
    case at::kHalf: return cpu::Dtype::f16;
    default: TORCH_CHECK(false, op, ": expected a float32, bfloat16 or float16 tensor, got ", t.scalar_type());
  }
}

at::Tensor as_int32(const at::Tensor& t) {
  return (t.scalar_type() == at::kInt ? t : t.to(at::kInt)).contiguous();
}

// ------------------------------------------------------------------ write_kv

void write_kv_cpu(const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "write_kv: k and v must both be [N, kv_heads, head_dim], got ",
              k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "write_kv: caches must both be [num_blocks, block_size, kv_heads, head_dim], got ", k_cache.sizes(),
              " and ", v_cache.sizes());
  TORCH_CHECK(k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2), "write_kv: k is ", k.sizes(),
              " but the cache holds [.., .., ", k_cache.size(2), ", ", k_cache.size(3), "] per slot");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), "write_kv: k_cache and v_cache dtypes differ");
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "write_kv: caches need unit stride along head_dim");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == k.size(0), "write_kv: slot_mapping must be [",
              k.size(0), "], got ", slot_mapping.sizes());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt,
              "write_kv: slot_mapping must be int64 or int32");
  const int64_t n = k.size(0), hkv = k.size(1), d = k.size(2);
  if (n == 0) return;
  const int64_t slots_total = k_cache.size(0) * k_cache.size(1), bs = k_cache.size(1);
  // Same dtype as the cache and unit stride along head_dim: no copy for the engine's tensors (v is
  // often a strided view of a fused qkv projection; any row and head strides are fine).
  at::Tensor kk = k.to(k_cache.scalar_type()), vv = v.to(v_cache.scalar_type());
  if (kk.stride(2) != 1) kk = kk.contiguous();
  if (vv.stride(2) != 1) vv = vv.contiguous();
  const at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  const int64_t* slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(slot[i] < slots_total, "write_kv: slot ", slot[i], " out of range for a cache of ", slots_total,
                " slots");
  }
  const int64_t item = kk.element_size();
  const size_t row_bytes = size_t(d * item);
  const char* ksrc = static_cast<const char*>(kk.data_ptr());
  const char* vsrc = static_cast<const char*>(vv.data_ptr());
  char* kdst = static_cast<char*>(k_cache.data_ptr());
  char* vdst = static_cast<char*>(v_cache.data_ptr());
  const int64_t ks0 = kk.stride(0), ks1 = kk.stride(1), vs0 = vv.stride(0), vs1 = vv.stride(1);
  const int64_t kcs0 = k_cache.stride(0), kcs1 = k_cache.stride(1), kcs2 = k_cache.stride(2);
  const int64_t vcs0 = v_cache.stride(0), vcs1 = v_cache.stride(1), vcs2 = v_cache.stride(2);
  // Pure copy: memcpy per (token, head) row. Parallel only when there is enough of it (prefill).
  at::parallel_for(0, n, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, hkv * d)), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t s = slot[i];
      if (s < 0) continue;  // padding row: write nowhere
      const int64_t blk = s / bs, off = s % bs;
      for (int64_t h = 0; h < hkv; ++h) {
        std::memcpy(kdst + (blk * kcs0 + off * kcs1 + h * kcs2) * item, ksrc + (i * ks0 + h * ks1) * item, row_bytes);
        std::memcpy(vdst + (blk * vcs0 + off * vcs1 + h * vcs2) * item, vsrc + (i * vs0 + h * vs1) * item, row_bytes);
      }
    }
  });
}

// ------------------------------------------------------------------ paged_attention

at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3, "paged_attention: q must be [B, Hq, D], got ", q.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "paged_attention: caches must both be [num_blocks, block_size, kv_heads, head_dim], got ",
              k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t b = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t num_blocks = k_cache.size(0), bs = k_cache.size(1), hkv = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == d, "paged_attention: q has head_dim ", d, ", the cache ", k_cache.size(3));
  TORCH_CHECK(hkv > 0 && hq % hkv == 0, "paged_attention: query heads (", hq, ") must be a multiple of kv heads (",
              hkv, ")");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == k_cache.scalar_type(),
              "paged_attention: q, k_cache and v_cache must share a dtype, got ", q.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(k_cache.strides() == v_cache.strides() && k_cache.stride(3) == 1,
              "paged_attention: caches must share a layout with unit stride along head_dim");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == b, "paged_attention: block_tables must be [", b,
              ", max_blocks], got ", block_tables.sizes());
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.size(0) == b, "paged_attention: context_lens must be [", b,
              "], got ", context_lens.sizes());
  const cpu::Dtype dtype = kernel_dtype("paged_attention", q);
  const at::Tensor qq = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor tables = as_int32(block_tables), lens = as_int32(context_lens);
  const int32_t* table = tables.data_ptr<int32_t>();
  const int32_t* len = lens.data_ptr<int32_t>();
  const int64_t width = tables.size(1);
  for (int64_t i = 0; i < b; ++i) {  // every block a sequence reads must exist
    TORCH_CHECK(len[i] >= 0 && len[i] <= width * bs, "paged_attention: context_lens[", i, "] = ", len[i],
                " does not fit a block table of ", width, " blocks of ", bs);
    for (int64_t j = 0; j < (len[i] + bs - 1) / bs; ++j) {
      TORCH_CHECK(table[i * width + j] >= 0 && table[i * width + j] < num_blocks, "paged_attention: block_tables[",
                  i, ", ", j, "] = ", table[i * width + j], " is not a block of the cache (", num_blocks, ")");
    }
  }
  at::Tensor out = at::empty({b, hq, d}, q.options());
  if (b == 0 || hq == 0) return out;
  cpu::AttentionArgs args{};
  args.q = qq.data_ptr();
  args.k_cache = k_cache.data_ptr();
  args.v_cache = v_cache.data_ptr();
  args.out = out.data_ptr();
  args.block_tables = table;
  args.context_lens = len;
  args.q_stride_b = qq.stride(0);
  args.q_stride_h = qq.stride(1);
  args.out_stride_b = out.stride(0);
  args.out_stride_h = out.stride(1);
  args.cache_stride_block = k_cache.stride(0);
  args.cache_stride_slot = k_cache.stride(1);
  args.cache_stride_head = k_cache.stride(2);
  args.table_stride = width;
  args.block_size = bs;
  args.kv_heads = hkv;
  args.groups = hq / hkv;
  args.head_dim = d;
  args.scale = float(scale);
  at::parallel_for(0, b * hkv, 1, [&](int64_t begin, int64_t end) { cpu::paged_attention(dtype, args, begin, end); });
  return out;
}

// ------------------------------------------------------------------ sample

std::tuple<at::Tensor, at::Tensor> sample_cpu(const at::Tensor& logits, const c10::optional<at::Tensor>& keys,
                                              double temperature, int64_t top_k, double top_p) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, "sample: logits must be [B, V] with V > 0, got ",
              logits.sizes());
  TORCH_CHECK(temperature >= 0.0, "sample: temperature must be >= 0, got ", temperature);
  TORCH_CHECK(top_k >= 0, "sample: top_k must be >= 0, got ", top_k);
  TORCH_CHECK(top_p > 0.0 && top_p <= 1.0, "sample: top_p must be in (0, 1], got ", top_p);
  const cpu::Dtype dtype = kernel_dtype("sample", logits);
  const int64_t b = logits.size(0), vocab = logits.size(1);
  const at::Tensor x = logits.stride(1) == 1 ? logits : logits.contiguous();
  at::Tensor key_t;
  if (temperature > 0.0) {
    TORCH_CHECK(keys.has_value(), "sample: keys are required when temperature > 0");
    TORCH_CHECK(keys->dim() == 1 && keys->size(0) == b, "sample: keys must be [", b, "], got ", keys->sizes());
    key_t = keys->to(at::kLong).contiguous();
  }
  at::Tensor tokens = at::empty({b}, logits.options().dtype(at::kLong));
  at::Tensor logprobs = at::empty({b}, logits.options().dtype(at::kFloat));
  cpu::SampleArgs args{};
  args.logits = x.data_ptr();
  args.row_stride = x.stride(0);
  args.vocab = vocab;
  args.keys = key_t.defined() ? key_t.data_ptr<int64_t>() : nullptr;
  args.temperature = temperature;
  args.top_k = top_k;
  args.top_p = top_p;
  args.tokens = tokens.data_ptr<int64_t>();
  args.logprobs = logprobs.data_ptr<float>();
  at::parallel_for(0, b, 1, [&](int64_t begin, int64_t end) { cpu::sample(dtype, args, begin, end); });
  return {tokens, logprobs};
}

// ------------------------------------------------------------------ decoder-layer ops

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1), "rms_norm: weight must be [",
              x.size(-1), "], got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: x and weight must share a dtype, got ",
              x.scalar_type(), " and ", weight.scalar_type());
  const cpu::Dtype dtype = kernel_dtype("rms_norm", x);
  const int64_t h = x.size(-1);
  const at::Tensor x2 = x.reshape({-1, h});
  const at::Tensor xx = x2.stride(1) == 1 ? x2 : x2.contiguous();
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const int64_t rows = xx.size(0);
  if (rows == 0 || h == 0) return out;
  cpu::RmsNormArgs args{xx.data_ptr(), xx.stride(0), w.data_ptr(), out.data_ptr(), h, float(eps)};
  // Parallel only for prefill-sized inputs: a decode batch is a few microseconds of work.
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / h), [&](int64_t begin, int64_t end) {
    cpu::rms_norm(dtype, args, begin, end);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> rotary_embedding_cpu(const at::Tensor& q, const at::Tensor& k,
                                                        const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && q.size(0) == k.size(0) && q.size(2) == k.size(2),
              "rotary_embedding: q and k must be [N, heads, head_dim] with the same N and head_dim, got ", q.sizes(),
              " and ", k.sizes());
  const int64_t n = q.size(0), d = q.size(2);
  TORCH_CHECK(d % 2 == 0, "rotary_embedding: head_dim must be even, got ", d);
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == n && cos.size(1) == d && sin.sizes() == cos.sizes(),
              "rotary_embedding: cos and sin must be [", n, ", ", d, "], got ", cos.sizes(), " and ", sin.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && cos.scalar_type() == q.scalar_type() &&
                  sin.scalar_type() == q.scalar_type(),
              "rotary_embedding: q, k, cos and sin must share a dtype");
  const cpu::Dtype dtype = kernel_dtype("rotary_embedding", q);
  const at::Tensor qq = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor kk = k.stride(2) == 1 ? k : k.contiguous();
  const at::Tensor cc = cos.contiguous(), s = sin.contiguous();  // [N, D], both row stride D
  at::Tensor q_out = at::empty(q.sizes(), q.options());
  at::Tensor k_out = at::empty(k.sizes(), k.options());
  const int64_t rows = n * (q.size(1) + k.size(1));
  if (rows == 0 || d == 0) return {q_out, k_out};
  cpu::RotaryArgs args{qq.data_ptr(), kk.data_ptr(), cc.data_ptr(), s.data_ptr(), q_out.data_ptr(), k_out.data_ptr(),
                       qq.stride(0), qq.stride(1), kk.stride(0), kk.stride(1), cc.stride(0), q.size(1), k.size(1), d};
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / d), [&](int64_t begin, int64_t end) {
    cpu::rotary(dtype, args, begin, end);
  });
  return {q_out, k_out};
}

}  // namespace

TORCH_LIBRARY(rlvr_fast, m) {
  m.def("write_kv(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens, "
        "float scale) -> Tensor");
  m.def("sample(Tensor logits, Tensor? keys, float temperature, int top_k=0, float top_p=1.0) -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_embedding(Tensor q, Tensor k, Tensor cos, Tensor sin) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(rlvr_fast, CPU, m) {
  m.impl("write_kv", &write_kv_cpu);
  m.impl("paged_attention", &paged_attention_cpu);
  m.impl("sample", &sample_cpu);
  m.impl("rms_norm", &rms_norm_cpu);
  m.impl("rotary_embedding", &rotary_embedding_cpu);
}

}  // namespace rlvr_fast

// An importable Python module with no Python-level contents: importing it runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rlvr_fast native ops (torch.ops.rlvr_fast)", -1,
                                      nullptr};
  return PyModule_Create(&module);
}
