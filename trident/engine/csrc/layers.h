// Decoder-layer steps and paged attention (layers.cpp), used by the fused step (forward.cpp).
#pragma once

#include "common.h"

namespace trident {

// f(row) for rows 0..n-1 of a cheap per-row step (norm, RoPE, K/V write, SwiGLU), on several
// threads only for long prompts: each parallel region ends in a barrier, and a decode step of
// 30 layers would pass ~150 more of them, each a stall whenever another process (Triton's own
// threads, on 2 cores) has preempted a worker.
template <typename F>
void for_rows(int64_t n, F f) {
  if (n >= 256) {
    at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) f(i);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) f(i);
  }
}

// ---- the paged KV cache: per layer (blocks, 2, kv heads, block size, head dim) ----------------

inline void to_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void to_float(const uint16_t* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; i += 8)
    _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
}
inline void from_float(const float* src, float* dst, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
inline void from_float(const float* src, uint16_t* dst, int64_t n) {  // round half to even
  for (int64_t i = 0; i < n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

struct Paged {
  int64_t n_kv, bs, hd, num_blocks, max_blocks;
  const int64_t* pos;
  const int64_t* slot;
  const int32_t* tables;  // (slots, max_blocks)
  int64_t block_stride() const { return 2 * n_kv * bs * hd; }
  int64_t block_of(int64_t row, int64_t t) const { return tables[slot[row] * max_blocks + t / bs]; }
};

// out = w * (x * rsqrt(mean(x^2) + eps)) for one row (Hugging Face's LlamaRMSNorm in fp32)
void rms_norm_row(const float* x, const float* w, float* out, int64_t H, float eps);
// RoPE in place on one head at one position (sin_signed: its first half negated, see llama.py)
void rope(float* x, const float* cos, const float* sin_signed, int64_t hd);
// act = silu(gate) * up for one row of gate_up = [gate | up]; inter % 8 == 0
void swiglu_row(const float* gu, int64_t inter, float* act);
// each row's K and V (after its q part in a qkv row) into its sequence's block at its position
template <typename S>
void write_kv(const float* qkv, int64_t qkv_size, int64_t q_size, S* kv, const Paged& p, int64_t T);
// o (T, num_heads * hd): each query row against positions 0..pos of its sequence, or with a
// sliding window (window > 0) against the last `window` of them, pos - window + 1..pos
template <typename S>
void attention(const float* q, int64_t q_stride, const S* kv, const Paged& p, int64_t T, int64_t num_heads,
               float scale, int64_t window, float* o);
// checks the cache, positions, slots and block tables of T rows; kv_dims 6 with a layer axis
Paged check_paged(const at::Tensor& kv, int64_t kv_dims, const at::Tensor& positions, const at::Tensor& row_slots,
                  const at::Tensor& tables, int64_t T);

}  // namespace trident
