// The steps of a decoder layer between its matmuls (RMSNorm, RoPE, SwiGLU) and attention over
// the paged KV cache, shared by the fused step (forward.cpp) and the reference ops.
#include "layers.h"

namespace trident {

// out = w * (x * rsqrt(mean(x^2) + eps)), per row (Hugging Face's LlamaRMSNorm in fp32)
void rms_norm_row(const float* x, const float* w, float* out, int64_t H, float eps) {
  const float r = 1.f / std::sqrt(dot(x, x, H) / static_cast<float>(H) + eps);
  for (int64_t i = 0; i < H; ++i) out[i] = w[i] * (x[i] * r);
}

// x * cos + rotate_half(x) * sin for one head; sin_signed has its first half negated (llama.py)
void rope(float* x, const float* cos, const float* sin_signed, int64_t hd) {
  const int64_t half = hd / 2;
  float rot[512];
  for (int64_t i = 0; i < half; ++i) rot[i] = x[i + half], rot[i + half] = x[i];
  for (int64_t i = 0; i < hd; ++i) x[i] = x[i] * cos[i] + rot[i] * sin_signed[i];
}

// act = silu(gate) * up = gate / (1 + e^-gate) * up, for gate_up = [gate | up]; inter % 8 == 0
void swiglu_row(const float* gu, int64_t inter, float* act) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < inter; i += 8) {
    const __m256 g = _mm256_loadu_ps(gu + i);
    const __m256 e = exp_ps(_mm256_xor_ps(g, sign));
    _mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(gu + inter + i)));
  }
}

template <typename S>
void write_kv(const float* qkv, int64_t qkv_size, int64_t q_size, S* kv, const Paged& p, int64_t T) {
  for_rows(T, [&](int64_t i) {
    const int64_t t = p.pos[i], off = t % p.bs;
    S* base = kv + p.block_of(i, t) * p.block_stride();
    const float* row = qkv + i * qkv_size + q_size;
    for (int64_t g = 0; g < p.n_kv; ++g) {
      from_float(row + g * p.hd, base + (g * p.bs + off) * p.hd, p.hd);
      from_float(row + (p.n_kv + g) * p.hd, base + ((p.n_kv + g) * p.bs + off) * p.hd, p.hd);
    }
  });
}

// e = exp(s - max) in place for n scores; returns 1 / sum(e) (8-lane partial sums, then hsum)
float softmax_unnormalized(float* s, int64_t n) {
  __m256 mx8 = _mm256_set1_ps(-INFINITY);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) mx8 = _mm256_max_ps(mx8, _mm256_loadu_ps(s + i));
  float mx = hmax(mx8);
  for (int64_t k = i; k < n; ++k) mx = std::max(mx, s[k]);
  const __m256 m = _mm256_set1_ps(mx);
  __m256 sum = _mm256_setzero_ps();
  for (i = 0; i + 8 <= n; i += 8) {
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  if (i < n) {  // the tail through the same exp, padding lanes zeroed
    alignas(32) float tail[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::copy(s + i, s + n, tail);
    const __m256 e = exp_ps(_mm256_sub_ps(_mm256_load_ps(tail), m));
    _mm256_store_ps(tail, e);
    std::copy(tail, tail + (n - i), s + i);
    for (int64_t k = n - i; k < 8; ++k) tail[k] = 0.f;
    sum = _mm256_add_ps(sum, _mm256_load_ps(tail));
  }
  return 1.f / hsum(sum);
}

// scale * (q . k_u) for the 8 keys k_0..k_7 at k (row stride hd, hd % 8 == 0): one FMA chain per
// key, its 8 lanes summed in a fixed tree, so a key's score never depends on its neighbours
inline __m256 scores8(const float* q, const float* k, int64_t hd, __m256 scale) {
  __m256 acc[8];
  for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
  for (int64_t c = 0; c < hd; c += 8) {
    const __m256 qv = _mm256_loadu_ps(q + c);
    for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + u * hd + c), acc[u]);
  }
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
  const __m256 sum = _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
  return _mm256_mul_ps(sum, scale);
}

// o (T, num_heads * hd) for query rows q (row stride q_stride); query head h reads kv head
// h / group. Scores in fp32 (8 keys at a time), softmax in fp32, the output scaled by 1 / sum at
// the end. Up to 4 consecutive rows of one sequence (a prompt) share the keys and values they
// convert; a row's arithmetic depends only on its own length, whatever tile it is in, so prefill
// and decode rows agree bit for bit.
constexpr int64_t kTileRows = 4;  // prompt rows sharing the K/V they convert

template <typename S>
void attention(const float* q, int64_t q_stride, const S* kv, const Paged& p, int64_t T, int64_t num_heads,
               float scale, int64_t window, float* o) {
  const int64_t group = num_heads / p.n_kv, hd = p.hd, bs = p.bs, gh = group * hd;
  std::vector<int64_t> tiles{0};  // row ranges [tiles[k], tiles[k + 1])
  int64_t keys = 0;
  for (int64_t i = 0; i < T; ++i) {
    keys += p.pos[i] + 1;
    const int64_t start = tiles.back();
    if (i > start && (i - start == kTileRows || p.slot[i] != p.slot[start] || p.pos[i] != p.pos[i - 1] + 1))
      tiles.push_back(i);
  }
  tiles.push_back(T);
  const int64_t n_tiles = static_cast<int64_t>(tiles.size()) - 1;
  const __m256 scale8 = _mm256_set1_ps(scale);
  auto task = [&](int64_t k) {
    thread_local std::vector<float> scores, kf, vf;
    const int64_t i0 = tiles[k / p.n_kv], rows = tiles[k / p.n_kv + 1] - i0, g = k % p.n_kv;
    const int64_t len = p.pos[i0 + rows - 1] + 1, padded = (len + 7) / 8 * 8;  // the tile's longest row
    // the first position any row of the tile sees (its first row's window), down to a block
    const int64_t first = window > 0 ? std::max<int64_t>(0, p.pos[i0] + 1 - window) / 8 * 8 / bs * bs : 0;
    scores.resize(rows * group * padded);
    kf.resize(padded * hd);  // K and V of positions first..len-1 in fp32, K zero up to a multiple of 8
    vf.resize(len * hd);
    std::fill(kf.begin() + len * hd, kf.end(), 0.f);
    for (int64_t t0 = first; t0 < len; t0 += bs) {
      const S* block = kv + p.block_of(i0, t0) * p.block_stride();
      const int64_t n = std::min(len, t0 + bs) - t0;
      to_float(block + g * bs * hd, kf.data() + t0 * hd, n * hd);
      to_float(block + (p.n_kv + g) * bs * hd, vf.data() + t0 * hd, n * hd);
    }
    float inv[kTileRows * 64];
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t n = p.pos[i0 + r] + 1;
      // keys s0..n-1: all of them, or the window's; scores from s0 rounded down to 8
      const int64_t s0 = window > 0 ? std::max<int64_t>(0, n - window) : 0, a0 = s0 / 8 * 8;
      for (int64_t j = 0; j < group; ++j) {
        const float* qj = q + (i0 + r) * q_stride + g * gh + j * hd;
        float* sc = scores.data() + (r * group + j) * padded;
        for (int64_t t = a0; t < n; t += 8) _mm256_storeu_ps(sc + t, scores8(qj, kf.data() + t * hd, hd, scale8));
        inv[r * group + j] = softmax_unnormalized(sc + s0, n - s0);
        float* out = o + (i0 + r) * num_heads * hd + g * gh + j * hd;
        for (int64_t c0 = 0; c0 < hd; c0 += 64) {  // 8 accumulators: 64 outputs at a time
          const int64_t m = std::min<int64_t>(64, hd - c0) / 8;
          __m256 acc[8];
          for (int64_t u = 0; u < m; ++u) acc[u] = _mm256_setzero_ps();
          for (int64_t t = s0; t < n; ++t) {
            const __m256 e = _mm256_set1_ps(sc[t]);
            const float* v = vf.data() + t * hd + c0;
            for (int64_t u = 0; u < m; ++u) acc[u] = _mm256_fmadd_ps(e, _mm256_loadu_ps(v + 8 * u), acc[u]);
          }
          const __m256 w = _mm256_set1_ps(inv[r * group + j]);
          for (int64_t u = 0; u < m; ++u) _mm256_storeu_ps(out + c0 + 8 * u, _mm256_mul_ps(acc[u], w));
        }
      }
    }
  };
  if (keys * p.n_kv >= 50000) {  // below that (a short decode batch) one thread is quicker
    parallel_tasks(n_tiles * p.n_kv, task);
  } else {
    for (int64_t k = 0; k < n_tiles * p.n_kv; ++k) task(k);
  }
}

Paged check_paged(const at::Tensor& kv, int64_t kv_dims, const at::Tensor& positions, const at::Tensor& row_slots,
                  const at::Tensor& tables, int64_t T) {
  TORCH_CHECK(kv.dim() == kv_dims && kv.is_contiguous() && (kv.scalar_type() == at::kHalf || kv.scalar_type() == at::kFloat),
              "kv must be contiguous float16 or float32 ([layers,] blocks, 2, kv heads, block size, head dim)");
  TORCH_CHECK(positions.scalar_type() == at::kLong && positions.is_contiguous() && positions.numel() == T &&
                  row_slots.scalar_type() == at::kLong && row_slots.is_contiguous() && row_slots.numel() == T,
              "positions and row_slots must be int64 with one entry per row");
  TORCH_CHECK(tables.dim() == 2 && tables.scalar_type() == at::kInt && tables.is_contiguous(),
              "block_tables must be contiguous int32 (slots, blocks per sequence)");
  const int64_t d = kv_dims - 5;
  Paged p{kv.size(d + 2), kv.size(d + 3), kv.size(d + 4), kv.size(d + 0), tables.size(1),
          positions.data_ptr<int64_t>(), row_slots.data_ptr<int64_t>(), tables.data_ptr<int32_t>()};
  TORCH_CHECK(p.hd % 16 == 0 && p.hd <= 512 && kv.size(d + 1) == 2, "head dim must be a multiple of 16, <= 512");
  for (int64_t i = 0; i < T; ++i) {
    TORCH_CHECK(p.slot[i] >= 0 && p.slot[i] < tables.size(0), "row slot out of range");
    TORCH_CHECK(p.pos[i] >= 0 && p.pos[i] < p.max_blocks * p.bs, "position out of range of the block table");
    for (int64_t b = 0; b <= p.pos[i] / p.bs; ++b) {
      const int32_t blk = p.tables[p.slot[i] * p.max_blocks + b];
      TORCH_CHECK(blk >= 0 && blk < p.num_blocks, "block table entry ", blk, " out of range");
    }
  }
  return p;
}

template void write_kv<float>(const float*, int64_t, int64_t, float*, const Paged&, int64_t);
template void write_kv<uint16_t>(const float*, int64_t, int64_t, uint16_t*, const Paged&, int64_t);
template void attention<float>(const float*, int64_t, const float*, const Paged&, int64_t, int64_t, float, int64_t,
                               float*);
template void attention<uint16_t>(const float*, int64_t, const uint16_t*, const Paged&, int64_t, int64_t, float,
                                  int64_t, float*);

}  // namespace trident
