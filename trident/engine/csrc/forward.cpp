// The whole int4 model step as one kernel call: any mix of prompt rows (prefill) and one-token
// rows (decode) of several sequences, over a paged KV cache (float16 or float32).
//
// A row is (token, position, slot): it writes its K/V into its sequence's block at that position
// and attends to positions 0..position of that sequence. Prefill and decode rows run the same
// code, so the K/V of a position depend only on the tokens up to it, never on how they were
// batched or chunked: a block computed for one request is bit for bit what any other request
// with the same prefix would compute (prefix reuse changes no output), and a sequence's tokens
// do not depend on the rest of the batch (see gemm.cpp for the matmuls).
#include "layers.h"

namespace trident {

namespace {

struct Shapes {
  int64_t L, H, V, q_size, kv_size, qkv_size, inter, num_heads;
};

Shapes check_weights(const at::Tensor& embed, const at::Tensor& norm, const at::Tensor& lm_head,
                     const at::Tensor& attn_norm, const at::Tensor& ffn_norm, const at::Tensor& wqkv,
                     const at::Tensor& wo, const at::Tensor& w_gate_up, const at::Tensor& w_down, int64_t num_heads,
                     int64_t num_kv_heads, int64_t hd) {
  const int64_t nb_e = check_packed(embed, kQ8Bytes, "embed"), nb_h = check_packed(lm_head, kQ8Bytes, "lm_head");
  const int64_t H = nb_e * kBlock, L = attn_norm.size(0);
  for (const at::Tensor* w : {&wqkv, &wo, &w_gate_up, &w_down})
    TORCH_CHECK(w->dim() == 3 && w->size(0) == L && w->scalar_type() == at::kByte && w->is_contiguous(),
                "layer weights must be contiguous uint8 (layers, N / 8, row-group bytes)");
  for (const at::Tensor* w : {&attn_norm, &ffn_norm})
    TORCH_CHECK(w->dim() == 2 && w->size(0) == L && w->size(1) == H && w->scalar_type() == at::kFloat &&
                    w->is_contiguous(), "norm weights must be contiguous float32 (layers, hidden)");
  TORCH_CHECK(norm.numel() == H && norm.scalar_type() == at::kFloat && norm.is_contiguous(),
              "norm must be float32 (hidden,)");
  const int64_t q_size = num_heads * hd, kv_size = num_kv_heads * hd;
  const int64_t inter = w_down.size(2) / kQ4Bytes * kBlock;
  TORCH_CHECK(nb_h * kBlock == H && wqkv.size(1) * kGroup == q_size + 2 * kv_size &&
                  wqkv.size(2) == nb_e * kQ4Bytes && wo.size(1) * kGroup == H && wo.size(2) * kBlock == q_size * kQ4Bytes &&
                  w_gate_up.size(1) * kGroup == 2 * inter && w_gate_up.size(2) == nb_e * kQ4Bytes &&
                  w_down.size(1) * kGroup == H && inter % 8 == 0 && w_down.size(2) % kQ4Bytes == 0,
              "forward_q4: weight shapes do not match");
  return {L, H, lm_head.size(0) * kGroup, q_size, kv_size, q_size + 2 * kv_size, inter, num_heads};
}

template <typename S>
void layers(const Shapes& s, float* x, int64_t T, const int64_t* logit_rows, int64_t R, const Paged& paged_in,
            const at::Tensor& attn_norm, const at::Tensor& ffn_norm, const at::Tensor& wqkv, const at::Tensor& wo,
            const at::Tensor& w_gate_up, const at::Tensor& w_down, const float* qkv_bias, const float* qk_norm,
            const bool* rope_layers, S* kv, const float* cos, const float* sin_signed, int64_t rd,
            const int64_t* rope_rows, float eps, float scale, int64_t window) {
  // rd: the dimensions of each head RoPE turns (partial rotary: fewer than hd), the tables' width
  const int64_t hd = paged_in.hd, heads = s.num_heads + paged_in.n_kv;
  const int64_t layer_stride = paged_in.num_blocks * paged_in.block_stride();
  std::vector<float> h(T * std::max(s.H, s.q_size)), qkv(T * s.qkv_size), gu(T * 2 * s.inter), act(T * s.inter);
  std::vector<int64_t> pos(paged_in.pos, paged_in.pos + T), slot(paged_in.slot, paged_in.slot + T);
  Paged p = paged_in;
  for (int64_t l = 0; l < s.L; ++l) {
    const float* an = attn_norm.data_ptr<float>() + l * s.H;
    const float* fn = ffn_norm.data_ptr<float>() + l * s.H;
    for_rows(T, [&](int64_t i) { rms_norm_row(x + i * s.H, an, h.data() + i * s.H, s.H, eps); });
    q4_gemm(h.data(), T, s.H, wqkv.data_ptr<uint8_t>() + l * wqkv.stride(0), s.qkv_size, qkv.data(), s.qkv_size, false);
    const float* bias = qkv_bias ? qkv_bias + l * s.qkv_size : nullptr;
    const float* q_norm = qk_norm ? qk_norm + l * 2 * hd : nullptr;
    const bool with_rope = !rope_layers || rope_layers[l];  // SmolLM3's NoPE layers apply none
    for_rows(T, [&](int64_t i) {
      float* row = qkv.data() + i * s.qkv_size;
      if (bias)  // Qwen2: q, k and v biases
        for (int64_t j = 0; j < s.qkv_size; ++j) row[j] += bias[j];
      if (q_norm)  // Qwen3: each query head, then each key head, RMS-normed before RoPE
        for (int64_t k = 0; k < heads; ++k)
          rms_norm_row(row + k * hd, k < s.num_heads ? q_norm : q_norm + hd, row + k * hd, hd, eps);
      if (with_rope) {
        const int64_t t = rope_rows ? rope_rows[i] : pos[i];  // the table row (LongRoPE: short or long)
        for (int64_t k = 0; k < heads; ++k) rope(row + k * hd, cos + t * rd, sin_signed + t * rd, rd);
      }
    });
    S* kv_l = kv + l * layer_stride;
    p.pos = pos.data();
    p.slot = slot.data();
    write_kv(qkv.data(), s.qkv_size, s.q_size, kv_l, p, T);
    if (l == s.L - 1 && R < T) {
      // The last layer's K/V are written; only the rows whose logits are wanted go on.
      for (int64_t r = 0; r < R; ++r) {
        const int64_t i = logit_rows[r];
        std::memmove(qkv.data() + r * s.qkv_size, qkv.data() + i * s.qkv_size, s.qkv_size * sizeof(float));
        std::memmove(x + r * s.H, x + i * s.H, s.H * sizeof(float));
        pos[r] = pos[i];
        slot[r] = slot[i];
      }
      T = R;
      if (T == 0) break;  // a step of prompt chunks only: their K/V were all it had to compute
    }
    attention(qkv.data(), s.qkv_size, kv_l, p, T, s.num_heads, scale, window, h.data());
    q4_gemm(h.data(), T, s.q_size, wo.data_ptr<uint8_t>() + l * wo.stride(0), s.H, x, s.H, true);
    for_rows(T, [&](int64_t i) { rms_norm_row(x + i * s.H, fn, h.data() + i * s.H, s.H, eps); });
    q4_gemm(h.data(), T, s.H, w_gate_up.data_ptr<uint8_t>() + l * w_gate_up.stride(0), 2 * s.inter, gu.data(),
            2 * s.inter, false);
    for_rows(T, [&](int64_t i) { swiglu_row(gu.data() + i * 2 * s.inter, s.inter, act.data() + i * s.inter); });
    q4_gemm(act.data(), T, s.inter, w_down.data_ptr<uint8_t>() + l * w_down.stride(0), s.H, x, s.H, true);
  }
}

}  // namespace

// logits (R, V) of the rows logit_rows (increasing) after one step over T rows; writes every
// row's K/V into kv (layers, blocks, 2, kv heads, block size, head dim).
at::Tensor forward_q4(const at::Tensor& tokens, const at::Tensor& positions, const at::Tensor& row_slots,
                      const at::Tensor& block_tables, const at::Tensor& logit_rows, const at::Tensor& embed,
                      const at::Tensor& norm, const at::Tensor& lm_head, const at::Tensor& attn_norm,
                      const at::Tensor& ffn_norm, const at::Tensor& wqkv, const at::Tensor& wo,
                      const at::Tensor& w_gate_up, const at::Tensor& w_down, const at::Tensor& qkv_bias,
                      const at::Tensor& qk_norm, const at::Tensor& rope_layers, at::Tensor& kv, const at::Tensor& cos,
                      const at::Tensor& sin_signed, int64_t num_heads, int64_t num_kv_heads, double eps, double scale,
                      int64_t window, const at::Tensor& rope_rows) {
  TORCH_CHECK(window >= 0, "forward_q4: window must be >= 0 (0: none)");
  TORCH_CHECK(tokens.scalar_type() == at::kLong && tokens.dim() == 1 && tokens.is_contiguous() && tokens.numel() > 0,
              "tokens must be int64 (T,)");
  const int64_t T = tokens.numel();
  const Paged p = check_paged(kv, 6, positions, row_slots, block_tables, T);
  TORCH_CHECK(kv.size(0) == attn_norm.size(0) && p.n_kv == num_kv_heads && num_heads % num_kv_heads == 0 &&
                  num_heads / num_kv_heads <= 64, "forward_q4: kv cache does not match the model");
  const Shapes s = check_weights(embed, norm, lm_head, attn_norm, ffn_norm, wqkv, wo, w_gate_up, w_down, num_heads,
                                 num_kv_heads, p.hd);
  // (max positions, rotary dims): the whole head, or with partial rotary its first dimensions
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin_signed.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin_signed.is_contiguous() && cos.dim() == 2 && cos.size(1) >= 2 && cos.size(1) % 2 == 0 &&
                  cos.size(1) <= p.hd && sin_signed.sizes() == cos.sizes(),
              "rope tables must be float32 (max positions, rotary dims: even, at most head dim)");
  // rope_rows: each row's row of the tables (LongRoPE's two sets); empty: its position
  TORCH_CHECK(rope_rows.numel() == 0 || (rope_rows.scalar_type() == at::kLong && rope_rows.dim() == 1 &&
                                         rope_rows.is_contiguous() && rope_rows.numel() == T),
              "rope_rows must be empty or int64 (T,)");
  const int64_t* rr = rope_rows.numel() ? rope_rows.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < T; ++i) {
    const int64_t t = rr ? rr[i] : p.pos[i];
    TORCH_CHECK(t >= 0 && t < cos.size(0), "position beyond the rope tables");
  }
  // empty: the checkpoint has none (Llama); else (layers, qkv size) and (layers, 2, head dim)
  TORCH_CHECK(qkv_bias.numel() == 0 || (qkv_bias.scalar_type() == at::kFloat && qkv_bias.is_contiguous() &&
                                        qkv_bias.dim() == 2 && qkv_bias.size(0) == s.L && qkv_bias.size(1) == s.qkv_size),
              "qkv_bias must be empty or float32 (layers, q + 2 kv)");
  TORCH_CHECK(qk_norm.numel() == 0 || (qk_norm.scalar_type() == at::kFloat && qk_norm.is_contiguous() &&
                                       qk_norm.dim() == 3 && qk_norm.size(0) == s.L && qk_norm.size(1) == 2 &&
                                       qk_norm.size(2) == p.hd),
              "qk_norm must be empty or float32 (layers, 2, head dim)");
  TORCH_CHECK(rope_layers.numel() == 0 || (rope_layers.scalar_type() == at::kBool && rope_layers.is_contiguous() &&
                                           rope_layers.dim() == 1 && rope_layers.size(0) == s.L),
              "rope_layers must be empty (RoPE in every layer) or bool (layers,)");
  const bool* rl = rope_layers.numel() ? rope_layers.data_ptr<bool>() : nullptr;
  const float* bias = qkv_bias.numel() ? qkv_bias.data_ptr<float>() : nullptr;
  const float* qkn = qk_norm.numel() ? qk_norm.data_ptr<float>() : nullptr;
  TORCH_CHECK(logit_rows.scalar_type() == at::kLong && logit_rows.dim() == 1 && logit_rows.is_contiguous(),
              "logit_rows must be int64 (R,)");
  const int64_t R = logit_rows.numel();
  const int64_t* lr = logit_rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(lr[r] >= 0 && lr[r] < T && (r == 0 || lr[r] > lr[r - 1]), "logit_rows must increase within [0, T)");

  std::vector<float> x(T * s.H);
  q8_rows(embed.data_ptr<uint8_t>(), embed.size(0) * kGroup, s.H, tokens.data_ptr<int64_t>(), T, x.data());
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin_signed.data_ptr<float>();
  const float eps_f = static_cast<float>(eps), scale_f = static_cast<float>(scale);
  if (kv.scalar_type() == at::kHalf)
    layers(s, x.data(), T, lr, R, p, attn_norm, ffn_norm, wqkv, wo, w_gate_up, w_down, bias, qkn, rl,
           reinterpret_cast<uint16_t*>(kv.data_ptr<at::Half>()), cp, sp, cos.size(1), rr, eps_f, scale_f, window);
  else
    layers(s, x.data(), T, lr, R, p, attn_norm, ffn_norm, wqkv, wo, w_gate_up, w_down, bias, qkn, rl,
           kv.data_ptr<float>(), cp, sp, cos.size(1), rr, eps_f, scale_f, window);
  // rows 0..R-1 of x are the logit rows: layers() compacted them in the last layer when R < T,
  // and R == T means every row, in order
  const float* rows = x.data();
  std::vector<float> h(R * s.H);
  for (int64_t r = 0; r < R; ++r) rms_norm_row(rows + r * s.H, norm.data_ptr<float>(), h.data() + r * s.H, s.H, eps_f);
  at::Tensor logits = at::empty({R, s.V}, at::TensorOptions().dtype(at::kFloat));
  if (R > 0) q8_gemm(h.data(), R, s.H, lm_head.data_ptr<uint8_t>(), s.V, logits.data_ptr<float>(), s.V, false);
  return logits;
}

}  // namespace trident
