// Shared pieces of trident's CPU kernels (AVX2 + FMA + F16C baseline; an AVX-512 VNNI path for
// the integer dot products is chosen at run time, see isa()).
//
// Weight formats: a weight (N, K) is stored as N / 8 groups of 8 rows; each group holds its K
// input features as nb = K / 32 blocks, one after the other, and each block interleaves its 8
// rows so that one 256-bit register holds 4 consecutive inputs of each of the 8 rows:
//   q4 (160 bytes a block): 8 fp16 scales d, 8 fp16 minimums m, then 4 x 32 bytes P_0..P_3:
//       byte 4r + c of P_h holds q[r][4h + c] in its low nibble and q[r][16 + 4h + c] in its
//       high one (q in 0..15; weight = d * q + m: GGUF's Q4_1 block).
//   q8 (272 bytes a block): 8 fp16 scales d, then 8 x 32 bytes W_0..W_7: byte 4r + c of W_h is
//       q[r][4h + c] (int8; weight = d * q: GGUF's Q8_0 block).
// With this layout a block's products for 8 rows land in the 8 lanes of one register: no
// horizontal sums, one conversion and one scale per 8 rows, and each unpacked weight register
// is reused for every activation row of a tile (the register-blocked GEMM).
#pragma once

#include <immintrin.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace trident {

constexpr int64_t kBlock = 32;     // input features per scale
constexpr int64_t kGroup = 8;      // weight rows per group (one 32-bit lane each)
constexpr int64_t kQ4Bytes = 160;  // one block of a q4 group
constexpr int64_t kQ8Bytes = 272;  // one block of a q8 group

enum Isa : int64_t { kAvx2 = 0, kAvx512Vnni = 1 };
int64_t isa();                    // the integer dot-product path in use
int64_t set_isa(int64_t wanted);  // tests force AVX2 on an AVX-512 CPU; returns the path in use

// f(task) for tasks 0..n-1 on the caller's torch thread count, each thread taking the next task
// as it finishes one. Not at::parallel_for's equal shares: when another process preempts one
// thread (Triton's own threads share the 2 cores), the other takes over its remaining tasks
// instead of waiting at the barrier. Which thread runs a task changes no result: every output
// is computed by exactly one task.
template <typename F>
void parallel_tasks(int64_t n, F f) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || omp_in_parallel()) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(threads)
  for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
}

inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// sum a[i] * b[i]: two 8-lane FMA chains over 16 inputs at a time, then the scalar tail
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

// e^x, 8 lanes (Cephes' expf: range reduction by ln 2 in two parts, degree-5 polynomial;
// within 2 ulp of the exact value on [-87, 88]; below -87.3 it is clamped). One function for
// attention and SwiGLU on every path, so their results never depend on the CPU.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.3762626647949f));
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// Activation rows quantized per block of 32 to int8 (scale amax / 127, round half to even), as
// llama.cpp's Q8_1: the values, each block's scale d, d * sum(q) (what q4 minimums multiply)
// and sum(q) itself.
struct QuantizedActivations {
  std::vector<int8_t> q;      // (B, K)
  std::vector<float> scale;   // (B, nb)
  std::vector<float> sum;     // (B, nb)
  std::vector<int32_t> isum;  // (B, nb)
};

void quantize_activations(const float* x, int64_t B, int64_t K, QuantizedActivations& out);

// y (B, N) [row stride ldy] = x (B, K) @ w.T, or y += it; w: N / 8 groups of nb blocks.
void q4_gemm(const float* x, int64_t B, int64_t K, const uint8_t* w, int64_t N, float* y, int64_t ldy,
             bool accumulate);
void q8_gemm(const float* x, int64_t B, int64_t K, const uint8_t* w, int64_t N, float* y, int64_t ldy,
             bool accumulate);
// rows of a q8 weight, dequantized (an embedding lookup): out (R, K)
void q8_rows(const uint8_t* w, int64_t N, int64_t K, const int64_t* index, int64_t R, float* out);

int64_t check_packed(const at::Tensor& w, int64_t block_bytes, const char* name);  // -> nb

}  // namespace trident
