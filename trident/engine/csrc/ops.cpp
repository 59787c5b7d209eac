// The kernels as torch ops: torch.ops.trident.forward_q4 (forward.cpp) serves the engine; the
// others (one matmul, norm, SwiGLU, paged attention, dequantization, the ISA switch) let the
// tests build the same step from its parts and check the formats.
#include <torch/library.h>

#include "layers.h"

namespace trident {

at::Tensor forward_q4(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& row_slots,
                      const at::Tensor& block_tables, const at::Tensor& logit_rows, const at::Tensor& embed,
                      const at::Tensor& norm, const at::Tensor& lm_head, const at::Tensor& attn_norm,
                      const at::Tensor& ffn_norm, const at::Tensor& wqkv, const at::Tensor& wo,
                      const at::Tensor& w_gate_up, const at::Tensor& w_down, const at::Tensor& qkv_bias,
                      const at::Tensor& qk_norm, const at::Tensor& rope_layers, at::Tensor& kv, const at::Tensor& cos,
                      const at::Tensor& sin_signed, int64_t num_heads, int64_t num_kv_heads, double eps, double scale,
                      int64_t window, const at::Tensor& rope_rows);

namespace {

at::Tensor linear_op(const at::Tensor& x_in, const at::Tensor& w, bool q4) {
  const int64_t nb = check_packed(w, q4 ? kQ4Bytes : kQ8Bytes, q4 ? "q4_linear" : "q8_linear");
  const int64_t K = nb * kBlock, N = w.size(0) * kGroup;
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.size(-1) == K, "x must be float32 (..., ", K, ")");
  auto shape = x_in.sizes().vec();
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  (q4 ? q4_gemm : q8_gemm)(x.data_ptr<float>(), x.size(0), K, w.data_ptr<uint8_t>(), N, y.data_ptr<float>(), N, false);
  shape.back() = N;
  return y.view(shape);
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w) { return linear_op(x, w, true); }
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& w) { return linear_op(x, w, false); }

// Every row of a packed weight as float32 (N, K): exactly d * q (+ m), multiply then add.
at::Tensor dequant(const at::Tensor& w, bool q4) {
  const int64_t bytes = q4 ? kQ4Bytes : kQ8Bytes;
  const int64_t nb = check_packed(w, bytes, "dequant"), K = nb * kBlock, N = w.size(0) * kGroup;
  at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) {
    const int64_t r = n % kGroup;
    for (int64_t j = 0; j < nb; ++j) {
      const uint8_t* blk = wp + (n / kGroup) * nb * bytes + j * bytes;
      uint16_t dh, mh = 0;
      std::memcpy(&dh, blk + 2 * r, 2);
      if (q4) std::memcpy(&mh, blk + 16 + 2 * r, 2);
      const float d = half_to_float(dh), m = half_to_float(mh);
      float* dst = op + n * K + j * kBlock;
      for (int64_t k = 0; k < kBlock; ++k) {
        if (q4) {
          const int64_t h = (k % 16) / 4, c = k % 4;
          const uint8_t byte = blk[32 + 32 * h + 4 * r + c];
          dst[k] = d * static_cast<float>(k < 16 ? (byte & 0x0F) : (byte >> 4)) + m;
        } else {
          dst[k] = d * static_cast<float>(static_cast<int8_t>(blk[16 + 32 * (k / 4) + 4 * r + k % 4]));
        }
      }
    }
  }
  return out;
}

at::Tensor q4_dequant(const at::Tensor& w) { return dequant(w, true); }
at::Tensor q8_dequant(const at::Tensor& w) { return dequant(w, false); }

at::Tensor q8_rows_op(const at::Tensor& w, const at::Tensor& index_in) {
  const int64_t nb = check_packed(w, kQ8Bytes, "q8_rows"), K = nb * kBlock;
  const at::Tensor index = index_in.to(at::kLong).contiguous();
  at::Tensor out = at::empty({index.numel(), K}, at::TensorOptions().dtype(at::kFloat));
  q8_rows(w.data_ptr<uint8_t>(), w.size(0) * kGroup, K, index.data_ptr<int64_t>(), index.numel(), out.data_ptr<float>());
  return out;
}

at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "rms_norm: x must be float32 (B, H)");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == x.size(1), "rms_norm: weight must be float32 (H,)");
  at::Tensor out = at::empty_like(x);
  const int64_t H = x.size(1);
  for (int64_t b = 0; b < x.size(0); ++b)
    rms_norm_row(x.data_ptr<float>() + b * H, w.data_ptr<float>(), out.data_ptr<float>() + b * H, H,
                 static_cast<float>(eps));
  return out;
}

at::Tensor swiglu(const at::Tensor& gate_up_in) {
  TORCH_CHECK(gate_up_in.dim() == 2 && gate_up_in.scalar_type() == at::kFloat && gate_up_in.size(1) % 16 == 0,
              "swiglu: gate_up must be float32 (B, 2 * inter), inter a multiple of 8");
  const at::Tensor gu = gate_up_in.contiguous();
  const int64_t B = gu.size(0), inter = gu.size(1) / 2;
  at::Tensor act = at::empty({B, inter}, gu.options());
  for (int64_t b = 0; b < B; ++b) swiglu_row(gu.data_ptr<float>() + b * 2 * inter, inter, act.data_ptr<float>() + b * inter);
  return act;
}

at::Tensor paged_attention(const at::Tensor& q_in, const at::Tensor& kv, const at::Tensor& positions,
                           const at::Tensor& row_slots, const at::Tensor& tables, int64_t num_kv_heads, double scale,
                           int64_t window) {
  TORCH_CHECK(window >= 0, "paged_attention: window must be >= 0 (0: none)");
  const at::Tensor q = q_in.contiguous();
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat, "paged_attention: q must be float32 (T, heads * head dim)");
  const int64_t T = q.size(0);
  const Paged p = check_paged(kv, 5, positions, row_slots, tables, T);
  TORCH_CHECK(p.n_kv == num_kv_heads && q.size(1) % (p.hd * p.n_kv) == 0 && q.size(1) / p.hd / p.n_kv <= 64,
              "paged_attention: shapes do not match (at most 64 query heads per kv head)");
  const int64_t num_heads = q.size(1) / p.hd;
  at::Tensor o = at::empty_like(q);
  if (kv.scalar_type() == at::kHalf)
    attention(q.data_ptr<float>(), q.size(1), reinterpret_cast<const uint16_t*>(kv.data_ptr<at::Half>()), p, T,
              num_heads, static_cast<float>(scale), window, o.data_ptr<float>());
  else
    attention(q.data_ptr<float>(), q.size(1), kv.data_ptr<float>(), p, T, num_heads, static_cast<float>(scale), window,
              o.data_ptr<float>());
  return o;
}

int64_t set_kernel_isa(int64_t wanted) { return wanted < 0 ? isa() : set_isa(wanted); }

}  // namespace
}  // namespace trident

TORCH_LIBRARY(trident, m) {
  m.def("q4_linear(Tensor x, Tensor w) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor w) -> Tensor");
  m.def("q4_dequant(Tensor w) -> Tensor");
  m.def("q8_dequant(Tensor w) -> Tensor");
  m.def("q8_rows(Tensor w, Tensor index) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def("paged_attention(Tensor q, Tensor kv, Tensor positions, Tensor row_slots, Tensor block_tables, "
        "int num_kv_heads, float scale, int window=0) -> Tensor");
  m.def("set_kernel_isa(int isa) -> int");
  m.def("forward_q4(Tensor tokens, Tensor positions, Tensor row_slots, Tensor block_tables, Tensor logit_rows, "
        "Tensor embed, Tensor norm, Tensor lm_head, Tensor attn_norm, Tensor ffn_norm, Tensor wqkv, Tensor wo, "
        "Tensor w_gate_up, Tensor w_down, Tensor qkv_bias, Tensor qk_norm, Tensor rope_layers, Tensor(a!) kv, "
        "Tensor cos, Tensor sin_signed, int num_heads, int num_kv_heads, float eps, float scale, "
        "int window, Tensor rope_rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(trident, CPU, m) {
  m.impl("q4_linear", trident::q4_linear);
  m.impl("q8_linear", trident::q8_linear);
  m.impl("q4_dequant", trident::q4_dequant);
  m.impl("q8_dequant", trident::q8_dequant);
  m.impl("q8_rows", trident::q8_rows_op);
  m.impl("rms_norm", trident::rms_norm);
  m.impl("swiglu", trident::swiglu);
  m.impl("paged_attention", trident::paged_attention);
  m.impl("forward_q4", trident::forward_q4);
}

TORCH_LIBRARY_IMPL(trident, CatchAll, m) { m.impl("set_kernel_isa", trident::set_kernel_isa); }
