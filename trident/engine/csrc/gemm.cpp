// Block-quantized GEMM for trident's CPU engine: int8 activations x int4 (q4) or int8 (q8)
// weights in the interleaved layout of common.h.
//
// Every block sum is an exact integer, so the AVX2 path (vpmaddubsw + vpaddw + vpmaddwd) and the
// AVX-512 VNNI path (vpdpbusd) give the same int32; the float work after it (one conversion,
// acc += sum * (d_w * d_x), acc += m * d_x * sum(q_x), block after block) is the same
// instructions on both paths and for every tile size. So an output row is the same bits whatever
// the batch, the tile it fell in, the thread count or the ISA: sequences are batch-invariant.
#include "common.h"

#include <cstdlib>
#include <string>

namespace trident {

namespace {

bool cpu_has_vnni() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

int64_t detect_isa() {
  const char* env = std::getenv("TRIDENT_KERNEL_ISA");
  if (env != nullptr && std::string(env) == "avx2") return kAvx2;
  return cpu_has_vnni() ? kAvx512Vnni : kAvx2;
}

int64_t g_isa = detect_isa();

inline int32_t load4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- tiles: T activation rows x one group of 8 weight rows, all nb blocks --------------------

// With 1-2 activation rows a tile streams its weights from memory once (the memory-bound decode
// of one sequence): ask for the bytes ~1.5 KB ahead, the hardware prefetcher alone left the
// stream well below the machine's bandwidth.
template <int T, int64_t Bytes>
inline void prefetch_ahead(const uint8_t* blk) {
  if constexpr (T <= 2) {
    for (int64_t off = 0; off < Bytes; off += 64) _mm_prefetch(reinterpret_cast<const char*>(blk + 1536 + off), _MM_HINT_T0);
  }
}

template <int T>
inline void store_tile(const __m256 (&acc)[T], float* y, int64_t ldy, bool accumulate) {
  for (int t = 0; t < T; ++t) {
    float* out = y + t * ldy;
    _mm256_storeu_ps(out, accumulate ? _mm256_add_ps(_mm256_loadu_ps(out), acc[t]) : acc[t]);
  }
}

template <int T>
void q4_tile_avx2(const uint8_t* wg, int64_t nb, const int8_t* xq, const float* xd, const float* xs, float* y,
                  int64_t ldy, bool accumulate) {
  const int64_t K = nb * kBlock;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wg + j * kQ4Bytes;
    prefetch_ahead<T, kQ4Bytes>(blk);
    __m256i isum[T];
    for (int t = 0; t < T; ++t) isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 32 * h));
      const __m256i lo = _mm256_and_si256(p, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const int8_t* xb = xq + t * K + j * kBlock;
        // 16 products per int16 lane at most: |sum| <= 16 * 15 * 127 < 2^15, exact
        isum[t] = _mm256_add_epi16(isum[t], _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(xb + 4 * h))));
        isum[t] = _mm256_add_epi16(isum[t], _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(xb + 16 + 4 * h))));
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
    for (int t = 0; t < T; ++t) {
      const __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(isum[t], ones));
      acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw, _mm256_set1_ps(xd[t * nb + j])), acc[t]);
      acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[t * nb + j]), acc[t]);
    }
  }
  store_tile<T>(acc, y, ldy, accumulate);
}

template <int T>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni")))
void q4_tile_vnni(const uint8_t* wg, int64_t nb, const int8_t* xq, const float* xd, const float* xs, float* y,
                  int64_t ldy, bool accumulate) {
  const int64_t K = nb * kBlock;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wg + j * kQ4Bytes;
    prefetch_ahead<T, kQ4Bytes>(blk);
    __m256i isum[T];
    for (int t = 0; t < T; ++t) isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int h = 0; h < 4; ++h) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32 + 32 * h));
      const __m256i lo = _mm256_and_si256(p, low4);
      const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(p, 4), low4);
#pragma GCC unroll 8
      for (int t = 0; t < T; ++t) {
        const int8_t* xb = xq + t * K + j * kBlock;
        isum[t] = _mm256_dpbusd_epi32(isum[t], lo, _mm256_set1_epi32(load4(xb + 4 * h)));
        isum[t] = _mm256_dpbusd_epi32(isum[t], hi, _mm256_set1_epi32(load4(xb + 16 + 4 * h)));
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    const __m256 mw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 16)));
    for (int t = 0; t < T; ++t) {
      const __m256 s = _mm256_cvtepi32_ps(isum[t]);
      acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(dw, _mm256_set1_ps(xd[t * nb + j])), acc[t]);
      acc[t] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xs[t * nb + j]), acc[t]);
    }
  }
  store_tile<T>(acc, y, ldy, accumulate);
}

template <int T>
void q8_tile_avx2(const uint8_t* wg, int64_t nb, const int8_t* xq, const float* xd, const int32_t* /*xi*/,
                  float* y, int64_t ldy, bool accumulate) {
  const int64_t K = nb * kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wg + j * kQ8Bytes;
    prefetch_ahead<T, kQ8Bytes>(blk);
    __m256i isum[T];
    for (int t = 0; t < T; ++t) isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int h = 0; h < 8; ++h) {
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * h));
      const __m256i wabs = _mm256_sign_epi8(w, w);  // |w| as the unsigned operand, w's sign moves to x
      for (int t = 0; t < T; ++t) {
        const __m256i x = _mm256_set1_epi32(load4(xq + t * K + j * kBlock + 4 * h));
        const __m256i pairs = _mm256_maddubs_epi16(wabs, _mm256_sign_epi8(x, w));  // |pair| <= 2 * 127^2
        isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(pairs, ones));
      }
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    for (int t = 0; t < T; ++t)
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_mul_ps(dw, _mm256_set1_ps(xd[t * nb + j])),
                               acc[t]);
  }
  store_tile<T>(acc, y, ldy, accumulate);
}

template <int T>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512vnni")))
void q8_tile_vnni(const uint8_t* wg, int64_t nb, const int8_t* xq, const float* xd, const int32_t* xi, float* y,
                  int64_t ldy, bool accumulate) {
  const int64_t K = nb * kBlock;
  const __m256i bias = _mm256_set1_epi8(static_cast<char>(0x80));
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t j = 0; j < nb; ++j) {
    const uint8_t* blk = wg + j * kQ8Bytes;
    prefetch_ahead<T, kQ8Bytes>(blk);
    __m256i isum[T];
    for (int t = 0; t < T; ++t) isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int h = 0; h < 8; ++h) {
      // w + 128 as the unsigned operand: sum (w + 128) x = sum w x + 128 sum x, corrected below
      const __m256i wu = _mm256_xor_si256(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + 32 * h)), bias);
      for (int t = 0; t < T; ++t)
        isum[t] = _mm256_dpbusd_epi32(isum[t], wu, _mm256_set1_epi32(load4(xq + t * K + j * kBlock + 4 * h)));
    }
    const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk)));
    for (int t = 0; t < T; ++t) {
      const __m256i s = _mm256_sub_epi32(isum[t], _mm256_set1_epi32(128 * xi[t * nb + j]));
      acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(xd[t * nb + j])), acc[t]);
    }
  }
  store_tile<T>(acc, y, ldy, accumulate);
}

// ---- drivers ---------------------------------------------------------------------------------

constexpr int64_t kGroupChunk = 16;  // most weight groups a task: kept hot in L1/L2 while every row tile passes

template <int T>
void q4_tile(const uint8_t* wg, int64_t nb, const QuantizedActivations& a, int64_t b0, float* y, int64_t ldy,
             bool accumulate, bool vnni) {
  const int64_t K = nb * kBlock;
  const int8_t* xq = a.q.data() + b0 * K;
  const float* xd = a.scale.data() + b0 * nb;
  const float* xs = a.sum.data() + b0 * nb;
  if (vnni) q4_tile_vnni<T>(wg, nb, xq, xd, xs, y, ldy, accumulate);
  else q4_tile_avx2<T>(wg, nb, xq, xd, xs, y, ldy, accumulate);
}

template <int T>
void q8_tile(const uint8_t* wg, int64_t nb, const QuantizedActivations& a, int64_t b0, float* y, int64_t ldy,
             bool accumulate, bool vnni) {
  const int64_t K = nb * kBlock;
  const int8_t* xq = a.q.data() + b0 * K;
  const float* xd = a.scale.data() + b0 * nb;
  const int32_t* xi = a.isum.data() + b0 * nb;
  if (vnni) q8_tile_vnni<T>(wg, nb, xq, xd, xi, y, ldy, accumulate);
  else q8_tile_avx2<T>(wg, nb, xq, xd, xi, y, ldy, accumulate);
}

template <bool Q4>
void gemm(const float* x, int64_t B, int64_t K, const uint8_t* w, int64_t N, float* y, int64_t ldy, bool accumulate) {
  const int64_t nb = K / kBlock, groups = N / kGroup;
  const int64_t group_bytes = nb * (Q4 ? kQ4Bytes : kQ8Bytes);
  // kept between calls (no allocation per matmul); a reference, so that the worker threads read
  // this thread's copy (a thread_local named in the lambda would be each worker's own)
  thread_local QuantizedActivations buffers;
  QuantizedActivations& a = buffers;
  quantize_activations(x, B, K, a);
  const bool vnni = g_isa == kAvx512Vnni;
  // AVX2 has 16 vector registers: 4 rows a tile (2 accumulators each); AVX-512 has 32: 8 rows.
  const int64_t rows_per_tile = vnni ? 8 : 4;
  // tasks of up to 16 groups (weights kept hot while every row tile passes), at least ~8 a thread
  const int64_t chunk = std::clamp<int64_t>(groups / (8 * at::get_num_threads()), 1, kGroupChunk);
  parallel_tasks((groups + chunk - 1) / chunk, [&](int64_t task) {
    const int64_t g0 = task * chunk, g1 = std::min(groups, g0 + chunk);
    for (int64_t b0 = 0; b0 < B; b0 += rows_per_tile) {
      const int64_t rows = std::min(rows_per_tile, B - b0);
      for (int64_t g = g0; g < g1; ++g) {
        const uint8_t* wg = w + g * group_bytes;
        float* yt = y + b0 * ldy + g * kGroup;
#define TRIDENT_TILE(R) \
  (Q4 ? q4_tile<R>(wg, nb, a, b0, yt, ldy, accumulate, vnni) : q8_tile<R>(wg, nb, a, b0, yt, ldy, accumulate, vnni))
        switch (rows) {
          case 1: TRIDENT_TILE(1); break;
          case 2: TRIDENT_TILE(2); break;
          case 3: TRIDENT_TILE(3); break;
          case 4: TRIDENT_TILE(4); break;
          case 5: TRIDENT_TILE(5); break;
          case 6: TRIDENT_TILE(6); break;
          case 7: TRIDENT_TILE(7); break;
          default: TRIDENT_TILE(8); break;
        }
#undef TRIDENT_TILE
      }
    }
  });
}

}  // namespace

int64_t isa() { return g_isa; }

int64_t set_isa(int64_t wanted) {
  if (wanted == kAvx2 || (wanted == kAvx512Vnni && cpu_has_vnni())) g_isa = wanted;
  return g_isa;
}

void quantize_activations(const float* x, int64_t B, int64_t K, QuantizedActivations& out) {
  const int64_t nb = K / kBlock;
  out.q.resize(B * K);
  out.scale.resize(B * nb);
  out.sum.resize(B * nb);
  out.isum.resize(B * nb);
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  auto block = [&](int64_t i) {
    const float* src = x + i * kBlock;
    __m256 v[4];
    __m256 amax = _mm256_setzero_ps();
    for (int k = 0; k < 4; ++k) {
      v[k] = _mm256_loadu_ps(src + 8 * k);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[k]));
    }
    const float d = hmax(amax) / 127.f;
    const __m256 id = _mm256_set1_ps(d > 0.f ? 1.f / d : 0.f);
    __m256i q[4];
    for (int k = 0; k < 4; ++k) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], id));  // half to even
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + i * kBlock),
                        _mm256_permutevar8x32_epi32(bytes, order));
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    const int32_t s = _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
    out.scale[i] = d;
    out.isum[i] = s;
    out.sum[i] = d * static_cast<float>(s);
  };
  if (B * nb >= 4096) {
    at::parallel_for(0, B * nb, 1024, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) block(i);
    });
  } else {
    for (int64_t i = 0; i < B * nb; ++i) block(i);
  }
}

void q4_gemm(const float* x, int64_t B, int64_t K, const uint8_t* w, int64_t N, float* y, int64_t ldy,
             bool accumulate) {
  gemm<true>(x, B, K, w, N, y, ldy, accumulate);
}

void q8_gemm(const float* x, int64_t B, int64_t K, const uint8_t* w, int64_t N, float* y, int64_t ldy,
             bool accumulate) {
  gemm<false>(x, B, K, w, N, y, ldy, accumulate);
}

void q8_rows(const uint8_t* w, int64_t N, int64_t K, const int64_t* index, int64_t R, float* out) {
  const int64_t nb = K / kBlock, group_bytes = nb * kQ8Bytes;
  for (int64_t i = 0; i < R; ++i) {
    const int64_t n = index[i];
    TORCH_CHECK(n >= 0 && n < N, "row index ", n, " out of range [0, ", N, ")");
    const uint8_t* wg = w + (n / kGroup) * group_bytes;
    const int64_t r = n % kGroup;
    for (int64_t j = 0; j < nb; ++j) {
      const uint8_t* blk = wg + j * kQ8Bytes;
      uint16_t dh;
      std::memcpy(&dh, blk + 2 * r, 2);
      const float d = half_to_float(dh);
      float* dst = out + i * K + j * kBlock;
      for (int h = 0; h < 8; ++h)
        for (int c = 0; c < 4; ++c)
          dst[4 * h + c] = d * static_cast<float>(static_cast<int8_t>(blk[16 + 32 * h + 4 * r + c]));
    }
  }
}

int64_t check_packed(const at::Tensor& w, int64_t block_bytes, const char* name) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(), name,
              ": weight must be contiguous uint8 (N / 8, row-group bytes)");
  const int64_t nb = w.size(1) / block_bytes;
  TORCH_CHECK(nb > 0 && nb * block_bytes == w.size(1), name, ": row-group bytes must be a multiple of ",
              block_bytes);
  return nb;
}

}  // namespace trident
