// Block-quantized weight kernels for trident's CPU engine (AVX2 + FMA + F16C).
//
// A weight (N, K) is stored as N rows of bytes; each row splits its K input features into
// nb = K/32 blocks of 32 and holds, in this order:
//   q4: nb fp16 scales d, nb fp16 minimums m, nb x 16 bytes of nibbles; weight = d * q + m with
//       q in 0..15; byte i of a block holds q[i] in its low nibble and q[16 + i] in its high one.
//   q8: nb fp16 scales d, nb x 32 int8; weight = d * q.
// Per block these are GGUF's Q4_1 and Q8_0: a checkpoint dequantized from such a file is
// recovered exactly (see quant.py), so the kernels compute with the checkpoint's own weights.
// Scales sit apart from the quantized values so that a row's scale arithmetic is done 8 blocks
// per instruction before the integer loop.
//
// Products are integer dot products, as llama.cpp does on AVX2: each activation row is
// quantized per block of 32 to int8 (scale amax/127), a block's 32 products are summed exactly in
// int32 (maddubs + madd), and the block sums are accumulated in fp32 with d_w * d_x. Decode at
// small batch is bound by reading the weights: 0.625 bytes per weight instead of 4 (fp32).
//
// Exposed as torch ops: torch.ops.trident.{q4_linear, q8_linear, q4_dequant, q8_dequant}, the fused
// decode layer decode_layer_q4, and its own steps {rms_norm, decode_attention, swiglu}.

#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;
constexpr int64_t kMaxBlocks = 512;  // K <= 16384
constexpr int kTile = 4;             // most activation rows per pass over the weight rows

template <bool Q4>
struct Format {
  static constexpr int64_t value_bytes = Q4 ? 16 : 32;  // per block
  static constexpr int64_t block_bytes = Q4 ? 20 : 34;  // with its fp16 scale (and minimum)
  static const uint16_t* scales(const uint8_t* row) { return reinterpret_cast<const uint16_t*>(row); }
  static const uint16_t* mins(const uint8_t* row, int64_t nb) { return reinterpret_cast<const uint16_t*>(row) + nb; }
  static const uint8_t* values(const uint8_t* row, int64_t nb) { return row + nb * (Q4 ? 4 : 2); }
};

inline float half(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 32 nibbles of a q4 block -> 32 bytes in weight order.
inline __m256i unpack_q4(const uint8_t* p) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i low4 = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(bytes, 4), low4), _mm_and_si128(bytes, low4));
}

// Sum of 32 u8 * s8 products as 8 float lanes (exact: the int16 pair sums cannot overflow for
// |s| <= 127 and u <= 127).
inline __m256 dot_u8s8(__m256i u, __m256i s) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

// Activations quantized per block of 32 (llama.cpp's Q8_1): int8 values, their scale, and
// scale * sum(values), which the q4 minimums multiply.
struct QuantizedActivations {
  std::vector<int8_t> q;     // (B, K)
  std::vector<float> scale;  // (B, nb)
  std::vector<float> sum;    // (B, nb)
};

void quantize_activations(const float* x, int64_t B, int64_t K, QuantizedActivations& out) {
  const int64_t nb = K / kBlock;
  out.q.resize(B * K);
  out.scale.resize(B * nb);
  out.sum.resize(B * nb);
  for (int64_t i = 0; i < B * nb; ++i) {
    const float* src = x + i * kBlock;
    float amax = 0.f;
    for (int k = 0; k < kBlock; ++k) amax = std::max(amax, std::fabs(src[k]));
    const float d = amax / 127.f;
    const float id = d > 0.f ? 1.f / d : 0.f;
    int sum = 0;
    int8_t* dst = out.q.data() + i * kBlock;
    for (int k = 0; k < kBlock; ++k) {
      const int v = static_cast<int>(std::nearbyint(src[k] * id));
      dst[k] = static_cast<int8_t>(v);
      sum += v;
    }
    out.scale[i] = d;
    out.sum[i] = d * static_cast<float>(sum);
  }
}

// out[j] = fp16 a[j] * b[j] for j < n; returns sum_j fp16 m[j] * c[j] when m is given.
inline float scale_row(const uint16_t* a, const float* b, float* out, int64_t n, const uint16_t* m,
                       const float* c) {
  __m256 macc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 av = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + j)));
    _mm256_storeu_ps(out + j, _mm256_mul_ps(av, _mm256_loadu_ps(b + j)));
    if (m) {
      const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + j)));
      macc = _mm256_fmadd_ps(mv, _mm256_loadu_ps(c + j), macc);
    }
  }
  float mins = hsum(macc);
  for (; j < n; ++j) {
    out[j] = half(a[j]) * b[j];
    if (m) mins += half(m[j]) * c[j];
  }
  return mins;
}

// y[b, n + r] for activation rows b0..b0+T-1 and weight rows n..n+R-1, with R*T independent
// accumulators (one FMA chain per block is latency-bound: B=1 runs 4 weight rows at once).
template <bool Q4, int R, int T>
inline void tile(const uint8_t* w, int64_t row_bytes, int64_t nb, const QuantizedActivations& a, int64_t b0,
                 float* __restrict y, int64_t N, int64_t n, bool accumulate) {
  using F = Format<Q4>;
  alignas(32) float scale[R][T][kMaxBlocks];
  float mins[R][T];
  const uint8_t* vals[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const uint8_t* row = w + (n + r) * row_bytes;
    vals[r] = F::values(row, nb);
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      const int64_t i = (b0 + t) * nb;
      mins[r][t] = scale_row(F::scales(row), a.scale.data() + i, scale[r][t], nb,
                             Q4 ? F::mins(row, nb) : nullptr, a.sum.data() + i);
    }
  }
  __m256 acc[R][T];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) acc[r][t] = _mm256_setzero_ps();
  const int8_t* xq = a.q.data() + b0 * nb * kBlock;
  for (int64_t j = 0; j < nb; ++j) {
    __m256i xv[T];
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t)
      xv[t] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + (t * nb + j) * kBlock));
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* p = vals[r] + j * F::value_bytes;
      // the hardware prefetcher alone left the 30 MB Q8 lm_head at ~5 GB/s on one core
      _mm_prefetch(reinterpret_cast<const char*>(p + R * row_bytes), _MM_HINT_T0);
      if constexpr (Q4) {
        const __m256i q = unpack_q4(p);
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t)
          acc[r][t] = _mm256_fmadd_ps(dot_u8s8(q, xv[t]), _mm256_broadcast_ss(&scale[r][t][j]), acc[r][t]);
      } else {
        const __m256i q = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        const __m256i qa = _mm256_sign_epi8(q, q);  // |q| as the unsigned operand
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t)
          acc[r][t] = _mm256_fmadd_ps(dot_u8s8(qa, _mm256_sign_epi8(xv[t], q)), _mm256_broadcast_ss(&scale[r][t][j]),
                                      acc[r][t]);
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int t = 0; t < T; ++t) {
      float& out = y[(b0 + t) * N + n + r];
      out = (accumulate ? out : 0.f) + (hsum(acc[r][t]) + mins[r][t]);
    }
}

template <bool Q4, int T>
void rows(const uint8_t* w, int64_t row_bytes, int64_t nb, const QuantizedActivations& a, int64_t b0, float* y,
          int64_t N, int64_t n_begin, int64_t n_end, bool accumulate) {
  constexpr int R = T == 1 ? 4 : 2;
  int64_t n = n_begin;
  for (; n + R <= n_end; n += R) tile<Q4, R, T>(w, row_bytes, nb, a, b0, y, N, n, accumulate);
  for (; n < n_end; ++n) tile<Q4, 1, T>(w, row_bytes, nb, a, b0, y, N, n, accumulate);
}

template <bool Q4>
int64_t check_weight(const at::Tensor& w, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), name,
              ": weight must be contiguous uint8 (N, row bytes)");
  const int64_t nb = w.size(1) / Format<Q4>::block_bytes;
  TORCH_CHECK(nb > 0 && nb <= kMaxBlocks && nb * Format<Q4>::block_bytes == w.size(1), name,
              ": row bytes must be a multiple of ", Format<Q4>::block_bytes, " for at most ", kMaxBlocks, " blocks");
  return nb;
}

// y (B, N) = x (B, K) @ w.T, or y += it. x, y: contiguous float32.
template <bool Q4>
void linear_into(const float* x, int64_t B, const at::Tensor& w, int64_t nb, float* y, bool accumulate) {
  const int64_t N = w.size(0), K = nb * kBlock, row_bytes = w.size(1);
  QuantizedActivations a;
  quantize_activations(x, B, K, a);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  // tasks of 64 weight rows: each streams at least 23 KB of weights
  at::parallel_for(0, (N + 63) / 64, 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * 64, n1 = std::min(N, end * 64);
    for (int64_t b0 = 0; b0 < B; b0 += kTile) {
      switch (std::min<int64_t>(kTile, B - b0)) {
        case 1: rows<Q4, 1>(wp, row_bytes, nb, a, b0, y, N, n0, n1, accumulate); break;
        case 2: rows<Q4, 2>(wp, row_bytes, nb, a, b0, y, N, n0, n1, accumulate); break;
        case 3: rows<Q4, 3>(wp, row_bytes, nb, a, b0, y, N, n0, n1, accumulate); break;
        default: rows<Q4, 4>(wp, row_bytes, nb, a, b0, y, N, n0, n1, accumulate); break;
      }
    }
  });
}

template <bool Q4>
at::Tensor block_linear(const at::Tensor& x_in, const at::Tensor& w, const char* name) {
  const int64_t nb = check_weight<Q4>(w, name);
  const int64_t K = nb * kBlock;
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.size(-1) == K, name, ": x must be float32 (..., ", K, ")");
  auto shape = x_in.sizes().vec();
  const at::Tensor x = x_in.reshape({-1, K}).contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  linear_into<Q4>(x.data_ptr<float>(), x.size(0), w, nb, y.data_ptr<float>(), false);
  shape.back() = w.size(0);
  return y.view(shape);
}

// Rows of w -> float32 (R, K): exactly d * q (+ m), multiply then add, as GGUF dequantizes.
template <bool Q4>
at::Tensor block_dequant(const at::Tensor& w, const char* name) {
  using F = Format<Q4>;
  const int64_t nb = check_weight<Q4>(w, name);
  const int64_t N = w.size(0), K = nb * kBlock, row_bytes = w.size(1);
  at::Tensor out = at::empty({N, K}, at::TensorOptions().dtype(at::kFloat));
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* row = wp + n * row_bytes;
      for (int64_t j = 0; j < nb; ++j) {
        const float d = half(F::scales(row)[j]);
        const float m = Q4 ? half(F::mins(row, nb)[j]) : 0.f;
        const uint8_t* p = F::values(row, nb) + j * F::value_bytes;
        float* dst = op + n * K + j * kBlock;
        for (int i = 0; i < kBlock; ++i) {
          float q;
          if constexpr (Q4) {
            q = static_cast<float>(i < 16 ? (p[i] & 0x0F) : (p[i - 16] >> 4));
            dst[i] = d * q + m;
          } else {
            q = static_cast<float>(static_cast<int8_t>(p[i]));
            dst[i] = d * q;
          }
        }
      }
    }
  });
  return out;
}

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& w) { return block_linear<true>(x, w, "q4_linear"); }
at::Tensor q8_linear(const at::Tensor& x, const at::Tensor& w) { return block_linear<false>(x, w, "q8_linear"); }
at::Tensor q4_dequant(const at::Tensor& w) { return block_dequant<true>(w, "q4_dequant"); }
at::Tensor q8_dequant(const at::Tensor& w) { return block_dequant<false>(w, "q8_dequant"); }


// ---- one decoder layer of a one-token decode step, fused -------------------------------------

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out = w * (x * rsqrt(mean(x^2) + eps)), per row (Hugging Face's LlamaRMSNorm in fp32)
void rms_norm_rows(const float* x, const float* w, float* out, int64_t B, int64_t H, float eps) {
  for (int64_t b = 0; b < B; ++b) {
    const float* xb = x + b * H;
    const float r = 1.f / std::sqrt(dot(xb, xb, H) / static_cast<float>(H) + eps);
    for (int64_t i = 0; i < H; ++i) out[b * H + i] = w[i] * (xb[i] * r);
  }
}

// x * cos + rotate_half(x) * sin for one head at one position; sin_signed has its first half
// negated (see llama.py's apply_rope_).
inline void rope(float* x, const float* cos, const float* sin_signed, int64_t hd) {
  const int64_t half = hd / 2;
  float rot[1024];
  for (int64_t i = 0; i < half; ++i) rot[i] = x[i + half], rot[i + half] = x[i];
  for (int64_t i = 0; i < hd; ++i) x[i] = x[i] * cos[i] + rot[i] * sin_signed[i];
}

// One decode query per row b (q: row stride q_stride, heads in order) against slot b of the
// cache at positions 0..pos[b]; o: (B, num_heads * hd). Query head h reads kv head h / group.
// Softmax in fp32: scores, their max, exp, a sequential sum, times its reciprocal.
void decode_attention_rows(const float* qp, int64_t q_stride, const float* kvp, int64_t slots, int64_t num_kv_heads,
                           int64_t S, int64_t hd, const int64_t* pos, int64_t B, int64_t num_heads, float scale,
                           float* o) {
  const int64_t group = num_heads / num_kv_heads, q_size = num_heads * hd;
  const int64_t head_stride = S * hd, slot_stride = num_kv_heads * head_stride, half_stride = slots * slot_stride;
  at::parallel_for(0, B * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / num_kv_heads, g = task % num_kv_heads, len = pos[b] + 1;
      const float* keys = kvp + b * slot_stride + g * head_stride;
      const float* values = keys + half_stride;
      scores.resize(group * len);
      for (int64_t j = 0; j < group; ++j) {
        const float* q = qp + b * q_stride + (g * group + j) * hd;
        float* sc = scores.data() + j * len;
        float mx = -INFINITY;
        for (int64_t t = 0; t < len; ++t) {
          sc[t] = dot(q, keys + t * hd, hd) * scale;
          mx = std::max(mx, sc[t]);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < len; ++t) sum += (sc[t] = std::exp(sc[t] - mx));
        const float inv = 1.f / sum;
        float* out = o + b * q_size + (g * group + j) * hd;
        std::fill(out, out + hd, 0.f);
        for (int64_t t = 0; t < len; ++t) {
          const float pt = sc[t] * inv;
          const float* v = values + t * hd;
          for (int64_t i = 0; i < hd; ++i) out[i] += pt * v[i];
        }
      }
    }
  });
}

// act (B, inter) = silu(gate) * up for gate_up (B, 2 * inter) = [gate | up] per row
void swiglu_rows(const float* gu, int64_t B, int64_t inter, float* act) {
  for (int64_t b = 0; b < B; ++b) {
    const float* gate = gu + b * 2 * inter;
    const float* up = gate + inter;
    float* a = act + b * inter;
    for (int64_t i = 0; i < inter; ++i) a[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
  }
}

void decode_layer_q4(at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& ffn_norm, const at::Tensor& wqkv,
                     const at::Tensor& wo, const at::Tensor& w_gate_up, const at::Tensor& w_down, at::Tensor& kv,
                     const at::Tensor& positions, const at::Tensor& cos, const at::Tensor& sin_signed,
                     int64_t num_heads, int64_t num_kv_heads, double eps_d, double scale_d) {
  const float eps = static_cast<float>(eps_d), scale = static_cast<float>(scale_d);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat, "x must be contiguous float32 (B, H)");
  TORCH_CHECK(kv.dim() == 5 && kv.is_contiguous() && kv.scalar_type() == at::kFloat && kv.size(0) == 2,
              "kv must be contiguous float32 (2, slots, kv heads, S, head dim)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions must be int64");
  const int64_t B = x.size(0), H = x.size(1);
  const int64_t slots = kv.size(1), S = kv.size(3), hd = kv.size(4);
  TORCH_CHECK(kv.size(2) == num_kv_heads && B <= slots && positions.numel() == B && hd <= 1024 && hd % 2 == 0,
              "decode_layer_q4: shapes do not match");
  TORCH_CHECK(cos.is_contiguous() && sin_signed.is_contiguous() && cos.size(1) == hd, "rope tables must be (S, hd)");
  const int64_t q_size = num_heads * hd, kv_size = num_kv_heads * hd, qkv_size = q_size + 2 * kv_size;
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads");
  const int64_t nb_h = check_weight<true>(wqkv, "wqkv");
  const int64_t nb_o = check_weight<true>(wo, "wo");
  const int64_t nb_i = check_weight<true>(w_down, "w_down");
  const int64_t nb_gu = check_weight<true>(w_gate_up, "w_gate_up");
  const int64_t inter = nb_i * kBlock;
  TORCH_CHECK(nb_h * kBlock == H && nb_o * kBlock == q_size && wqkv.size(0) == qkv_size && wo.size(0) == H &&
                  nb_gu == nb_h && w_gate_up.size(0) == 2 * inter && w_down.size(0) == H,
              "decode_layer_q4: weight shapes do not match");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "position out of range");

  float* xp = x.data_ptr<float>();
  std::vector<float> h(B * std::max(H, q_size)), qkv(B * qkv_size), gu(B * 2 * inter), act(B * inter);

  // attention
  rms_norm_rows(xp, attn_norm.data_ptr<float>(), h.data(), B, H, eps);
  linear_into<true>(h.data(), B, wqkv, nb_h, qkv.data(), false);
  float* kvp = kv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin_signed.data_ptr<float>();
  const int64_t head_stride = S * hd, slot_stride = num_kv_heads * head_stride, half_stride = slots * slot_stride;
  for (int64_t b = 0; b < B; ++b) {
    float* row = qkv.data() + b * qkv_size;
    const int64_t p = pos[b];
    for (int64_t i = 0; i < num_heads + num_kv_heads; ++i) rope(row + i * hd, cp + p * hd, sp + p * hd, hd);
    for (int64_t g = 0; g < num_kv_heads; ++g) {
      std::memcpy(kvp + b * slot_stride + g * head_stride + p * hd, row + q_size + g * hd, hd * sizeof(float));
      std::memcpy(kvp + half_stride + b * slot_stride + g * head_stride + p * hd, row + q_size + kv_size + g * hd,
                  hd * sizeof(float));
    }
  }
  float* o = h.data();  // (B, q_size): the normed input is no longer needed
  decode_attention_rows(qkv.data(), qkv_size, kvp, slots, num_kv_heads, S, hd, pos, B, num_heads, scale, o);
  linear_into<true>(o, B, wo, nb_o, xp, true);

  // feed-forward
  rms_norm_rows(xp, ffn_norm.data_ptr<float>(), h.data(), B, H, eps);
  linear_into<true>(h.data(), B, w_gate_up, nb_gu, gu.data(), false);
  swiglu_rows(gu.data(), B, inter, act.data());
  linear_into<true>(act.data(), B, w_down, nb_i, xp, true);
}

// The fused layer's own norm, attention and SwiGLU as ops: the int4 reference decode
// (Llama._decode_ops) calls them, so each int8-quantized activation (the normed input, the
// attention output, the SwiGLU output) is the same bits as inside decode_layer_q4 on any CPU.
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& w_in, double eps) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat, "rms_norm: x must be float32 (B, H)");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous();
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == x.size(1), "rms_norm: weight must be float32 (H,)");
  at::Tensor out = at::empty_like(x);
  rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), x.size(0), x.size(1),
                static_cast<float>(eps));
  return out;
}

at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& kv, const at::Tensor& positions,
                            int64_t num_kv_heads, double scale) {
  TORCH_CHECK(kv.dim() == 5 && kv.is_contiguous() && kv.scalar_type() == at::kFloat && kv.size(0) == 2,
              "kv must be contiguous float32 (2, slots, kv heads, S, head dim)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous(), "positions must be int64");
  const at::Tensor q = q_in.contiguous();
  const int64_t slots = kv.size(1), S = kv.size(3), hd = kv.size(4), B = q.size(0);
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.size(1) % hd == 0,
              "decode_attention: q must be float32 (B, heads * head dim)");
  const int64_t num_heads = q.size(1) / hd;
  TORCH_CHECK(kv.size(2) == num_kv_heads && num_heads % num_kv_heads == 0 && B <= slots && positions.numel() == B,
              "decode_attention: shapes do not match");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) TORCH_CHECK(pos[b] >= 0 && pos[b] < S, "position out of range");
  at::Tensor o = at::empty({B, num_heads * hd}, q.options());
  decode_attention_rows(q.data_ptr<float>(), q.size(1), kv.data_ptr<float>(), slots, num_kv_heads, S, hd, pos, B,
                        num_heads, static_cast<float>(scale), o.data_ptr<float>());
  return o;
}

at::Tensor swiglu(const at::Tensor& gate_up_in) {
  TORCH_CHECK(gate_up_in.dim() == 2 && gate_up_in.scalar_type() == at::kFloat && gate_up_in.size(1) % 2 == 0,
              "swiglu: gate_up must be float32 (B, 2 * inter)");
  const at::Tensor gu = gate_up_in.contiguous();
  const int64_t B = gu.size(0), inter = gu.size(1) / 2;
  at::Tensor act = at::empty({B, inter}, gu.options());
  swiglu_rows(gu.data_ptr<float>(), B, inter, act.data_ptr<float>());
  return act;
}

}  // namespace

TORCH_LIBRARY(trident, m) {
  m.def("q4_linear(Tensor x, Tensor w) -> Tensor");
  m.def("q8_linear(Tensor x, Tensor w) -> Tensor");
  m.def("q4_dequant(Tensor w) -> Tensor");
  m.def("q8_dequant(Tensor w) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor kv, Tensor positions, int num_kv_heads, float scale) -> Tensor");
  m.def("swiglu(Tensor gate_up) -> Tensor");
  m.def(
      "decode_layer_q4(Tensor(a!) x, Tensor attn_norm, Tensor ffn_norm, Tensor wqkv, Tensor wo, Tensor w_gate_up, "
      "Tensor w_down, Tensor(b!) kv, Tensor positions, Tensor cos, Tensor sin_signed, int num_heads, "
      "int num_kv_heads, float eps, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(trident, CPU, m) {
  m.impl("q4_linear", q4_linear);
  m.impl("q8_linear", q8_linear);
  m.impl("q4_dequant", q4_dequant);
  m.impl("q8_dequant", q8_dequant);
  m.impl("rms_norm", rms_norm);
  m.impl("decode_attention", decode_attention);
  m.impl("swiglu", swiglu);
  m.impl("decode_layer_q4", decode_layer_q4);
}
