// CPU kernels for the hot path of MoE models: RMSNorm and decode attention, where eager PyTorch spends most of a
// small model's step in per-op overhead, and the MoE block (routed, or grouped for an expert shard), whose experts
// live here in column panels so that big layers stream their weights once per call. Built at first use by
// moe_serve/kernels/__init__.py (torch's cpp_extension, -O3 -march=native); every kernel here has a torch reference
// in moe_serve/model that tests compare against, and that runs when the build is not available.
//
// The matmul tiles use AVX-512 (with AVX512-BF16 and AVX512-VNNI where built for them: see "bf16 dot products"
// and "int8 dot products") or AVX2 intrinsics, with a portable fallback; other loops are written so that gcc
// vectorizes them (`#pragma omp simd`); work is split over torch's intra-op threads with
// at::parallel_for (OpenMP: built with -fopenmp). exp is a polynomial (see exp_poly) because
// libm's expf does not vectorize; it agrees with torch's exp to a few ulp.
//
// Shape legend: T tokens, D hidden, E experts, A experts per token, I expert width, B decoding sequences,
// H query heads, KVH key/value heads, G = H / KVH, L keys of the longest sequence, S KV slots, Hd head dim.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

// e^x for x in about [-87, 88], within ~2 ulp: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf scheme).
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest, vectorizable
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

#if defined(__AVX2__) && defined(__FMA__)
// Eight consecutive elements of a K/V row or a weight row (float32 or bf16), widened to float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  const __m128i halves = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(halves), 16));
}
#endif

// Rows of attention keys or values, hd elements each, scattered over the KV pages by a sequence's slots
// (`rows(j)` is row j's first element).
template <typename KV>
struct SlotRows {
  const KV* base;  // the pages, offset to this kv head's K or V
  const int64_t* slots;  // slot of row j
  int64_t stride;  // elements per slot
  const KV* operator()(int64_t j) const { return base + slots[j] * stride; }
};

// dots[j] = <q, keys(j)> for j in [0, n); 8 keys at a time share one horizontal sum.
template <typename KV, typename Rows>
inline void dot_rows(const float* q, const Rows& keys, int64_t n, int64_t hd, float* dots) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (hd % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      __m256 acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, load8(keys(j + u) + i), acc[u]);
      }
      const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
      // a's low lane holds keys 0..3 of the low halves, its high lane keys 0..3 of the high halves
      const __m256 lo = _mm256_permute2f128_ps(a, b, 0x20), hi = _mm256_permute2f128_ps(a, b, 0x31);
      _mm256_storeu_ps(dots + j, _mm256_add_ps(lo, hi));
    }
  }
#endif
  for (; j < n; ++j) {
    const KV* k = keys(j);
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < hd; ++i) dot += q[i] * static_cast<float>(k[i]);
    dots[j] = dot;
  }
}

// Software prefetch of the K/V row kAhead rows on: a sequence's rows are a KV slot apart (2 KVH Hd elements), so
// every few rows cross a 4 KiB page, where hardware stride prefetchers stop.
constexpr int64_t kAhead = 8;
template <typename KV>
inline void prefetch_row(const KV* row, int64_t hd) {
#if defined(__AVX2__) && defined(__FMA__)
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < hd * static_cast<int64_t>(sizeof(KV)); b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
#endif
}

// dots[g][j] = <q[g], keys(j)> for the G query heads that share one kv head, KT = 8 / G keys per tile: each key
// is widened once for all G heads, and the tile's 8 (key, head) sums share one horizontal-sum tree, summed as
// dot_rows sums (so a head's scores do not depend on how many heads share its keys).
template <int G, typename KV, typename Rows>
inline void dot_rows_heads(const float* const* q, const Rows& keys, int64_t n, int64_t hd, float* const* dots) {
  static_assert(8 % G == 0, "G must divide 8");
  constexpr int KT = 8 / G;
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (hd % 8 == 0) {
    for (; j + KT <= n; j += KT) {
      if (j + kAhead < n) prefetch_row(keys(j + kAhead), hd);  // rows sit a slot apart: past the hardware's reach
      __m256 acc[8];
      for (int m = 0; m < 8; ++m) acc[m] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        __m256 qv[G];
        for (int g = 0; g < G; ++g) qv[g] = _mm256_loadu_ps(q[g] + i);
        for (int u = 0; u < KT; ++u) {
          const __m256 kv = load8(keys(j + u) + i);
          for (int g = 0; g < G; ++g) acc[u * G + g] = _mm256_fmadd_ps(qv[g], kv, acc[u * G + g]);
        }
      }
      const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));
      alignas(32) float sums[8];
      _mm256_store_ps(sums, _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31)));
      for (int u = 0; u < KT; ++u)
        for (int g = 0; g < G; ++g) dots[g][j + u] = sums[u * G + g];
    }
  }
#endif
  for (; j < n; ++j) {
    const KV* k = keys(j);
    for (int g = 0; g < G; ++g) {
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < hd; ++i) dot += q[g][i] * static_cast<float>(k[i]);
      dots[g][j] = dot;
    }
  }
}

// Scores of `groups` query heads over the same keys: together where the group size divides 8, else head by head.
template <typename KV, typename Rows>
inline void score_rows(const float* const* q, int64_t groups, const Rows& keys, int64_t n, int64_t hd,
                       float* const* dots) {
  switch (groups) {
    case 2: dot_rows_heads<2, KV>(q, keys, n, hd, dots); return;
    case 4: dot_rows_heads<4, KV>(q, keys, n, hd, dots); return;
    case 8: dot_rows_heads<8, KV>(q, keys, n, hd, dots); return;
    default:
      for (int64_t g = 0; g < groups; ++g) dot_rows<KV>(q[g], keys, n, hd, dots[g]);
  }
}

// y[t][0..N) = sum_k x[t][k] * wt(k)[0..N) for NT rows (attention's values, wt(k) row k): register-blocked, each
// row read once per tile.
template <int NT, typename KV, typename Rows>
inline void gemm_tile(const float* const* x, const Rows& wt, int64_t k_dim, int64_t n_dim, float* const* y) {
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; c + 32 <= n_dim; c += 32) {
    __m256 acc[NT][4];
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < 4; ++u) acc[t][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_dim; ++k) {
      if (c == 0 && k + kAhead < k_dim) prefetch_row(wt(k + kAhead), n_dim);
      const KV* w = wt(k) + c;
      const __m256 w0 = load8(w), w1 = load8(w + 8), w2 = load8(w + 16), w3 = load8(w + 24);
      for (int t = 0; t < NT; ++t) {
        const __m256 xv = _mm256_set1_ps(x[t][k]);
        acc[t][0] = _mm256_fmadd_ps(xv, w0, acc[t][0]);
        acc[t][1] = _mm256_fmadd_ps(xv, w1, acc[t][1]);
        acc[t][2] = _mm256_fmadd_ps(xv, w2, acc[t][2]);
        acc[t][3] = _mm256_fmadd_ps(xv, w3, acc[t][3]);
      }
    }
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(y[t] + c + 8 * u, acc[t][u]);
  }
  for (; c + 8 <= n_dim; c += 8) {
    __m256 acc[NT];
    for (int t = 0; t < NT; ++t) acc[t] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_dim; ++k) {
      const __m256 w0 = load8(wt(k) + c);
      for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(x[t][k]), w0, acc[t]);
    }
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(y[t] + c, acc[t]);
  }
#endif
  for (; c < n_dim; ++c) {
    for (int t = 0; t < NT; ++t) {
      float s = 0.0f;
      for (int64_t k = 0; k < k_dim; ++k) s += x[t][k] * static_cast<float>(wt(k)[c]);
      y[t][c] = s;
    }
  }
}

template <typename KV, typename Rows>
void gemm_rows(const float* const* x, int64_t n, const Rows& wt, int64_t k_dim, int64_t n_dim, float* const* y) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) gemm_tile<4, KV>(x + t, wt, k_dim, n_dim, y + t);
  switch (n - t) {
    case 3: gemm_tile<3, KV>(x + t, wt, k_dim, n_dim, y + t); break;
    case 2: gemm_tile<2, KV>(x + t, wt, k_dim, n_dim, y + t); break;
    case 1: gemm_tile<1, KV>(x + t, wt, k_dim, n_dim, y + t); break;
    default: break;
  }
}

// ---- Expert matmuls over column panels ------------------------------------------------------------------------
// An expert matrix [K, N] (input rows, output columns) is stored as P = ceil(N / 32) panels of [K, 32], columns
// past N zero, each panel contiguous: it streams from memory in order and stays in cache while every token row
// uses it (moe_serve/kernels/layout.py writes this layout). Formats:
// - float32: a panel is [K, 32] floats; bfloat16 and float16: [K, 32] halves, widened to float32 as they load
//   (activations and accumulation stay float32);
// - int8: [K, 32] codes, y[c] = scale[c] * sum_k x[k] q[k][c] (per-column scales [P 32]);
// - int4: [K, 16] bytes, byte j holding column j (low nibble) and column j + 16 (high nibble), and
//   w[k][c] = q * scale[k / G][c] + offset[k / G][c] ([K / G, P 32] each); per group of G rows the tile sums
//   x q, then scales once: y += scale * sum_k(x q) + offset * sum_k(x).
// A few token rows share each weight load (a register tile). With more rows than a tile, a quantized panel is first
// decoded into floats (its codes, unscaled), which all row tiles then read: the same arithmetic as decoding inline,
// so a row's result never depends on how many rows share its expert.
constexpr int64_t kPanel = 32;

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kVecs = 2;  // vectors per panel row
inline Vec vzero() { return _mm512_setzero_ps(); }
inline Vec vset1(float v) { return _mm512_set1_ps(v); }
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline __m128i load16(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline void load_row(const float* p, Vec* w) {
  w[0] = vload(p);
  w[1] = vload(p + 16);
}
inline void load_row(const int8_t* p, Vec* w) {
  w[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(p)));
  w[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(p + 16)));
}
inline void load_row(const uint8_t* p, Vec* w) {  // int4: 16 bytes -> 32 codes
  const __m128i bytes = load16(p), mask = _mm_set1_epi8(0x0F);
  w[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, mask)));
  w[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask)));
}
inline __m256i load32(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
#elif defined(__AVX2__) && defined(__FMA__)
using Vec = __m256;
constexpr int kVecs = 4;
inline Vec vzero() { return _mm256_setzero_ps(); }
inline Vec vset1(float v) { return _mm256_set1_ps(v); }
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline void load_row(const float* p, Vec* w) {
  for (int u = 0; u < 4; ++u) w[u] = vload(p + 8 * u);
}
inline void load_row(const int8_t* p, Vec* w) {
  for (int u = 0; u < 4; ++u)
    w[u] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * u))));
}
inline void load_row(const uint8_t* p, Vec* w) {  // int4: 16 bytes -> 32 codes
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), mask = _mm_set1_epi8(0x0F);
  const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
  w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
  w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
  w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
inline __m128i load8x16(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
#else  // portable: eight floats per "vector", loops the compiler may vectorize
struct Vec {
  float v[8];
};
constexpr int kVecs = 4;
inline Vec vzero() { return Vec{}; }
inline Vec vset1(float x) {
  Vec r;
  for (float& e : r.v) e = x;
  return r;
}
inline Vec vload(const float* p) {
  Vec r;
  std::memcpy(r.v, p, sizeof r.v);
  return r;
}
inline void vstore(float* p, Vec a) { std::memcpy(p, a.v, sizeof a.v); }
inline Vec vfma(Vec a, Vec b, Vec c) {
  for (int i = 0; i < 8; ++i) c.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
  return c;
}
inline Vec vmul(Vec a, Vec b) {
  for (int i = 0; i < 8; ++i) a.v[i] *= b.v[i];
  return a;
}
inline void load_row(const float* p, Vec* w) {
  for (int u = 0; u < 4; ++u) w[u] = vload(p + 8 * u);
}
inline void load_row(const int8_t* p, Vec* w) {
  for (int c = 0; c < 32; ++c) w[c / 8].v[c % 8] = p[c];
}
inline void load_row(const uint8_t* p, Vec* w) {
  for (int c = 0; c < 32; ++c) w[c / 8].v[c % 8] = c < 16 ? (p[c] & 0x0F) : (p[c - 16] >> 4);
}
#endif
constexpr int64_t kLanes = kPanel / kVecs;

// One vector (kLanes consecutive elements) of float, bf16 or fp16 weights, widened to float32.
inline Vec load_vec(const float* p) { return vload(p); }
#if defined(__AVX512F__)
inline Vec load_vec(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load32(p)), 16));
}
inline Vec load_vec(const c10::Half* p) { return _mm512_cvtph_ps(load32(p)); }
inline float hsum(Vec v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
inline Vec load_vec(const c10::BFloat16* p) { return load8(p); }
inline Vec load_vec(const c10::Half* p) {
#if defined(__F16C__)
  return _mm256_cvtph_ps(load8x16(p));
#else
  float v[8];
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return vload(v);
#endif
}
inline float hsum(Vec v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}
#else
template <typename W>
inline Vec load_vec(const W* p) {
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = static_cast<float>(p[i]);
  return r;
}
inline float hsum(Vec v) {
  float s = 0.0f;
  for (float e : v.v) s += e;
  return s;
}
#endif
// ---- bf16 dot products (AVX512-BF16) ---------------------------------------------------------------------------
// Built with AVX512-BF16, bf16 weights meet bf16 activations in vdpbf16ps, which multiplies 32 bf16 pairs and adds
// each pair's two products into a float32 lane: twice the multiply-adds per instruction of widening the weights.
// The activations are rounded to bf16 once per call (round to nearest even, as torch's .bfloat16() and a
// transformers bf16 layer's input), the accumulation stays float32, and every row count takes this path, so a
// row's result still never depends on its batch. Other builds and formats widen as above.

// Rows x[0..n) (K floats each) rounded to bf16, each zero-padded to a multiple of 32 entries; read as 32-bit lanes,
// lane i of a row holds entries 2i (low half) and 2i + 1: the activation pairs vdpbf16ps takes.
struct Bf16Rows {
  std::vector<uint16_t> storage;
  std::vector<const uint32_t*> rows;

  Bf16Rows(const float* const* x, int64_t n, int64_t k) : rows(n) {
    const int64_t stride = (k + 31) / 32 * 32;
    storage.assign(n * stride, 0);
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        uint16_t* dst = storage.data() + j * stride;
#if defined(__AVX512BF16__)
        for (int64_t i = 0; i < k; i += 32) {
          float chunk[32] = {};  // whole vectors, the tail zero-padded
          std::memcpy(chunk, x[j] + i, std::min<int64_t>(32, k - i) * sizeof(float));
          const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(chunk + 16), _mm512_loadu_ps(chunk));
          _mm512_storeu_si512(dst + i, (__m512i)v);
        }
#else
        for (int64_t i = 0; i < k; ++i) dst[i] = c10::BFloat16(x[j][i]).x;
#endif
        rows[j] = reinterpret_cast<const uint32_t*>(dst);
      }
    });
  }
};

#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;

// Panel rows k and k + 1 ([32] bf16 each) -> two vectors of (row k, row k + 1) pairs: columns 0-15 and 16-31.
inline void load_pairs(const c10::BFloat16* row, const c10::BFloat16* next, __m512bh* w) {
  alignas(64) static constexpr uint16_t kLow[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                    8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static constexpr uint16_t kHigh[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                                     24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i a = _mm512_loadu_si512(row), b = next ? _mm512_loadu_si512(next) : _mm512_setzero_si512();
  w[0] = (__m512bh)_mm512_permutex2var_epi16(a, _mm512_load_si512(kLow), b);
  w[1] = (__m512bh)_mm512_permutex2var_epi16(a, _mm512_load_si512(kHigh), b);
}

// acc[t] = x[t] panel for NT rows, as panel_tile, two panel rows (one activation pair) per step.
template <int NT>
inline void panel_tile_bf16(const uint32_t* const* x, const c10::BFloat16* __restrict panel, int64_t k_dim,
                            Vec (*acc)[kVecs]) {
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < kVecs; ++u) acc[t][u] = vzero();
  for (int64_t k = 0; k < k_dim; k += 2) {
    __m512bh w[2];
    load_pairs(panel + k * kPanel, k + 1 < k_dim ? panel + (k + 1) * kPanel : nullptr, w);
    for (int t = 0; t < NT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[t][k / 2]));
      acc[t][0] = _mm512_dpbf16_ps(acc[t][0], xv, w[0]);
      acc[t][1] = _mm512_dpbf16_ps(acc[t][1], xv, w[1]);
    }
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

// ---- int8 dot products (AVX512-VNNI) ---------------------------------------------------------------------------
// Built with AVX512-VNNI (and VBMI's byte shuffles), int8 experts meet int8 activations in vpdpbusd, which
// multiplies 64 byte pairs and adds each group of four products into an int32 lane: four times the multiply-adds of
// widening to float. Each row is quantized once per call, symmetric with one scale (max |x| / 127, rounded to
// nearest), and stored offset by 128 as the unsigned operand; the offset's share, 128 times each column's sum, is
// taken off the integer result, which then scales by the row's and the column's scales. Like the bf16 path, every
// row count takes it. Where not built for it, int8 weights widen to float and activations stay fp32.
struct Int8Rows {
  std::vector<uint8_t> storage;
  std::vector<const uint32_t*> rows;  // lane i: entries 4i .. 4i + 3
  std::vector<float> scales;

  Int8Rows(const float* const* x, int64_t n, int64_t k) : rows(n), scales(n) {
    const int64_t stride = (k + 63) / 64 * 64;
    storage.assign(n * stride, 128);  // the padding stands for 0
    at::parallel_for(0, n, 16, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const float* src = x[j];
        float top = 0.0f;
#pragma omp simd reduction(max : top)
        for (int64_t i = 0; i < k; ++i) top = std::max(top, std::fabs(src[i]));
        scales[j] = top > 0.0f ? top / 127.0f : 1.0f;
        const float inv = 1.0f / scales[j];
        uint8_t* dst = storage.data() + j * stride;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= k; i += 16) {  // round to nearest even (the default mode), as std::nearbyint below
          const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + i), _mm512_set1_ps(inv)));
          const __m128i bytes = _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(128)));
          _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), bytes);
        }
#endif
        for (; i < k; ++i) dst[i] = static_cast<uint8_t>(static_cast<int>(std::nearbyint(src[i] * inv)) + 128);
        rows[j] = reinterpret_cast<const uint32_t*>(dst);
      }
    });
  }
};

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
constexpr bool kInt8Dot = true;

// Panel rows k .. k + 3 ([32] int8 each; rows past K read as zeros) -> two vectors of per-column quads
// (row k .. k + 3 of one column in one 32-bit lane): columns 0-15 and 16-31.
inline void load_quads(const int8_t* rows, int64_t valid_rows, __m512i* w) {
  alignas(64) static constexpr uint8_t kLow[64] = {
      0,  32, 64, 96,  1,  33, 65, 97,  2,  34, 66, 98,  3,  35, 67, 99,  4,  36, 68, 100, 5,  37,
      69, 101, 6, 38, 70, 102, 7,  39, 71, 103, 8,  40, 72, 104, 9,  41, 73, 105, 10, 42, 74, 106,
      11, 43, 75, 107, 12, 44, 76, 108, 13, 45, 77, 109, 14, 46, 78, 110, 15, 47, 79, 111};
  const __mmask64 first = valid_rows >= 2 ? ~__mmask64{0} : (__mmask64{1} << (32 * valid_rows)) - 1;
  const __mmask64 second = valid_rows >= 4 ? ~__mmask64{0}
                           : valid_rows <= 2 ? __mmask64{0}
                                             : (__mmask64{1} << (32 * (valid_rows - 2))) - 1;
  const __m512i a = _mm512_maskz_loadu_epi8(first, rows), b = _mm512_maskz_loadu_epi8(second, rows + 64);
  const __m512i low = _mm512_load_si512(kLow);
  w[0] = _mm512_permutex2var_epi8(a, low, b);
  w[1] = _mm512_permutex2var_epi8(a, _mm512_add_epi8(low, _mm512_set1_epi8(16)), b);
}

// y[t][c] = (x_q[t] . q[:, c] - 128 sum_k q[k][c]) for one int8 panel and NT rows (Int8Rows), in int32.
template <int NT>
inline void panel_tile_int8(const uint32_t* const* x, const int8_t* __restrict panel, int64_t k_dim,
                            __m512i (*acc)[kVecs]) {
  __m512i offset[kVecs] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < kVecs; ++u) acc[t][u] = _mm512_setzero_si512();
  const __m512i bias = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t k = 0; k < k_dim; k += 4) {
    __m512i w[2];
    load_quads(panel + k * kPanel, std::min<int64_t>(4, k_dim - k), w);
    for (int u = 0; u < kVecs; ++u) offset[u] = _mm512_dpbusd_epi32(offset[u], bias, w[u]);
    for (int t = 0; t < NT; ++t) {
      const __m512i xv = _mm512_set1_epi32(static_cast<int>(x[t][k / 4]));
      for (int u = 0; u < kVecs; ++u) acc[t][u] = _mm512_dpbusd_epi32(acc[t][u], xv, w[u]);
    }
  }
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < kVecs; ++u) acc[t][u] = _mm512_sub_epi32(acc[t][u], offset[u]);
}
#else
constexpr bool kInt8Dot = false;
#endif

// Rows per register tile: what the registers hold as accumulators besides a broadcast per row and one weight vector
// (AVX-512's 32: 8 rows of 2 vectors; AVX2's 16: 3 rows of 4). int4's tile also keeps a group's partial sums; with
// as many rows the compiler spills the accumulators, which are touched once a group, and that still beat half the
// rows (mid-size T=512: 152 vs 214 ms with AVX-512).
#if defined(__AVX512F__)
constexpr int kMaxRows = 8;
#else
constexpr int kMaxRows = 3;
#endif

// elements of one panel row: int4 packs two columns a byte
template <typename W>
constexpr int64_t panel_row = std::is_same<W, uint8_t>::value ? kPanel / 2 : kPanel;

// Vector u of a panel row (columns u kLanes .. (u + 1) kLanes), widened to float.
template <typename W>
inline Vec load_part(const W* row, int u) {
  return load_vec(row + u * kLanes);
}
inline Vec load_part(const int8_t* row, int u) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(load16(row + u * kLanes)));
#elif defined(__AVX2__) && defined(__FMA__)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + u * kLanes))));
#else
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = row[u * kLanes + i];
  return r;
#endif
}

// A whole panel row of 16-bit floats, widened (the float, int8 and int4 overloads are per instruction set above).
template <typename W>
inline void load_row(const W* p, Vec* w) {
  for (int u = 0; u < kVecs; ++u) w[u] = load_part(p, u);
}

// acc[t] = x[t] panel for NT rows (K long each): one panel's 32 columns. The row's x values broadcast once a k,
// then one panel vector at a time through every row: the registers hold
// the NT x kVecs accumulators, NT broadcasts and one weight vector (kMaxRows is sized for that).
template <typename W, int NT>
inline void panel_tile(const float* const* x, const W* __restrict panel, int64_t k_dim, Vec (*acc)[kVecs]) {
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < kVecs; ++u) acc[t][u] = vzero();
  for (int64_t k = 0; k < k_dim; ++k) {
    const W* row = panel + k * panel_row<W>;
    Vec xv[NT];
    for (int t = 0; t < NT; ++t) xv[t] = vset1(x[t][k]);
    for (int u = 0; u < kVecs; ++u) {
      const Vec w = load_part(row, u);
      for (int t = 0; t < NT; ++t) acc[t][u] = vfma(xv[t], w, acc[t][u]);
    }
  }
}

// int4's tile: codes summed per group of rows, then scale and offset (at the panel's columns, row stride n_pad);
// xsum[t][g] = sum of x[t] over group g.
template <typename W, int NT>
inline void panel_tile_grouped(const float* const* x, const float* const* xsum, const W* __restrict panel,
                               const float* scale, const float* offset, int64_t n_pad, int64_t group, int64_t k_dim,
                               Vec (*acc)[kVecs]) {
  for (int t = 0; t < NT; ++t)
    for (int u = 0; u < kVecs; ++u) acc[t][u] = vzero();
  for (int64_t g = 0; g * group < k_dim; ++g) {
    Vec part[NT][kVecs];
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < kVecs; ++u) part[t][u] = vzero();
    for (int64_t k = g * group; k < (g + 1) * group; ++k) {
      Vec w[kVecs];
      load_row(panel + k * panel_row<W>, w);
      for (int t = 0; t < NT; ++t) {
        const Vec xv = vset1(x[t][k]);
        for (int u = 0; u < kVecs; ++u) part[t][u] = vfma(xv, w[u], part[t][u]);
      }
    }
    for (int u = 0; u < kVecs; ++u) {
      const Vec sv = vload(scale + g * n_pad + u * kLanes), ov = vload(offset + g * n_pad + u * kLanes);
      for (int t = 0; t < NT; ++t) acc[t][u] = vfma(sv, part[t][u], vfma(vset1(xsum[t][g]), ov, acc[t][u]));
    }
  }
}

// y[t][c .. c + width) = acc[t] (times the column scales when given).
template <int NT>
inline void store_tile(Vec (*acc)[kVecs], const float* col_scale, int64_t width, float* const* y, int64_t c) {
  for (int t = 0; t < NT; ++t) {
    float row[kPanel];
    float* dst = width == kPanel ? y[t] + c : row;
    for (int u = 0; u < kVecs; ++u) vstore(dst + u * kLanes, col_scale ? vmul(acc[t][u], vload(col_scale + u * kLanes)) : acc[t][u]);
    if (dst == row) std::memcpy(y[t] + c, row, width * sizeof(float));
  }
}

// f(std::integral_constant<int, rows>) for 1 <= rows <= Max: a tile's row count as a compile-time constant.
template <int Max, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (Max > 1) {
    if (rows < Max) return with_rows<Max - 1>(rows, f);
  }
  f(std::integral_constant<int, Max>{});
}

// The formats an expert matrix comes in (see the panel layout above).
enum class Format { kFloat, kBFloat16, kHalf, kInt8, kInt4 };

struct Weight {
  Format format;
  const void* data;     // P panels
  const float* scale;   // int8: [P 32] per output column; int4: [K / G, P 32]; else none
  const float* offset;  // int4: [K / G, P 32]
  int64_t group;        // int4: G
};

// Rows as a dot-product path takes them: bf16 pairs (Bf16Rows) for bf16 weights, int8 quads and row scales
// (Int8Rows) for int8 weights; rows null: the float path.
struct DotRows {
  const uint32_t* const* rows = nullptr;
  const float* scales = nullptr;

  DotRows from(int64_t first) const { return rows ? DotRows{rows + first, scales ? scales + first : nullptr} : *this; }
};

// The rows x[0..n) in the form the dot-product path for `format` takes on this build, if it has one.
struct DotInput {
  Bf16Rows bf16;
  Int8Rows int8;
  DotRows view;

  DotInput(Format format, const float* const* x, int64_t n, int64_t k)
      : bf16(x, kBf16Dot && format == Format::kBFloat16 ? n : 0, k),
        int8(x, kInt8Dot && format == Format::kInt8 ? n : 0, k) {
    if (!bf16.rows.empty()) view = {bf16.rows.data(), nullptr};
    if (!int8.rows.empty()) view = {int8.rows.data(), int8.scales.data()};
  }
};

// Rows x[0..n) (K long each) times panel p of w ([K, N]) -> y[j][32 p .. 32 p + 32) (clipped to N). xsum: int4's
// per-group row sums. dot: the rows for this build's dot-product path for w's format (DotInput), else empty.
// scratch: K * 32 floats, for decoding a quantized panel once when more than a tile of rows share it.
void gemm_panel(const float* const* x, const float* const* xsum, DotRows dot, int64_t n, const Weight& w,
                int64_t k_dim, int64_t n_dim, int64_t p, float* const* y, float* scratch) {
  const int64_t n_pad = (n_dim + kPanel - 1) / kPanel * kPanel, c = p * kPanel;
  const int64_t width = std::min(kPanel, n_dim - c);
#if defined(__AVX512BF16__)
  if (dot.rows && w.format == Format::kBFloat16) {
    const auto* panel = static_cast<const c10::BFloat16*>(w.data) + p * k_dim * kPanel;
    for (int64_t t = 0; t < n; t += kMaxRows) {
      with_rows<kMaxRows>(std::min<int64_t>(kMaxRows, n - t), [&](auto rows) {
        constexpr int NT = decltype(rows)::value;
        Vec acc[NT][kVecs];
        panel_tile_bf16<NT>(dot.rows + t, panel, k_dim, acc);
        store_tile<NT>(acc, nullptr, width, y + t, c);
      });
    }
    return;
  }
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__)
  if (dot.rows && w.format == Format::kInt8) {
    const int8_t* panel = static_cast<const int8_t*>(w.data) + p * k_dim * kPanel;
    for (int64_t t = 0; t < n; t += kMaxRows) {
      with_rows<kMaxRows>(std::min<int64_t>(kMaxRows, n - t), [&](auto rows) {
        constexpr int NT = decltype(rows)::value;
        __m512i sums[NT][kVecs];
        panel_tile_int8<NT>(dot.rows + t, panel, k_dim, sums);
        Vec acc[NT][kVecs];
        for (int r = 0; r < NT; ++r)
          for (int u = 0; u < kVecs; ++u) acc[r][u] = vmul(_mm512_cvtepi32_ps(sums[r][u]), vset1(dot.scales[t + r]));
        store_tile<NT>(acc, w.scale + c, width, y + t, c);
      });
    }
    return;
  }
#endif
  const float* decoded = nullptr;
  if (w.format != Format::kFloat && n > kMaxRows) {
    Vec row[kVecs];
    for (int64_t k = 0; k < k_dim; ++k) {
      const int64_t at = (p * k_dim + k) * kPanel;
      switch (w.format) {
        case Format::kInt8: load_row(static_cast<const int8_t*>(w.data) + at, row); break;
        case Format::kBFloat16: load_row(static_cast<const c10::BFloat16*>(w.data) + at, row); break;
        case Format::kHalf: load_row(static_cast<const c10::Half*>(w.data) + at, row); break;
        default: load_row(static_cast<const uint8_t*>(w.data) + at / 2, row); break;
      }
      for (int u = 0; u < kVecs; ++u) vstore(scratch + k * kPanel + u * kLanes, row[u]);
    }
    decoded = scratch;
  }
  if (w.format == Format::kInt4) {
    const uint8_t* codes = static_cast<const uint8_t*>(w.data) + p * k_dim * (kPanel / 2);
    for (int64_t t = 0; t < n; t += kMaxRows) {
      with_rows<kMaxRows>(std::min<int64_t>(kMaxRows, n - t), [&](auto rows) {
        constexpr int NT = decltype(rows)::value;
        Vec acc[NT][kVecs];
        if (decoded) {
          panel_tile_grouped<float, NT>(x + t, xsum + t, decoded, w.scale + c, w.offset + c, n_pad, w.group, k_dim, acc);
        } else {
          panel_tile_grouped<uint8_t, NT>(x + t, xsum + t, codes, w.scale + c, w.offset + c, n_pad, w.group, k_dim, acc);
        }
        store_tile<NT>(acc, nullptr, width, y + t, c);
      });
    }
    return;
  }
  for (int64_t t = 0; t < n; t += kMaxRows) {
    with_rows<kMaxRows>(std::min<int64_t>(kMaxRows, n - t), [&](auto rows) {
      constexpr int NT = decltype(rows)::value;
      Vec acc[NT][kVecs];
      if (w.format == Format::kFloat) {
        panel_tile<float, NT>(x + t, static_cast<const float*>(w.data) + p * k_dim * kPanel, k_dim, acc);
        store_tile<NT>(acc, nullptr, width, y + t, c);
        return;
      }
      const int64_t at = p * k_dim * kPanel;
      if (decoded) {
        panel_tile<float, NT>(x + t, decoded, k_dim, acc);
      } else if (w.format == Format::kInt8) {
        panel_tile<int8_t, NT>(x + t, static_cast<const int8_t*>(w.data) + at, k_dim, acc);
      } else if (w.format == Format::kBFloat16) {
        panel_tile<c10::BFloat16, NT>(x + t, static_cast<const c10::BFloat16*>(w.data) + at, k_dim, acc);
      } else {
        panel_tile<c10::Half, NT>(x + t, static_cast<const c10::Half*>(w.data) + at, k_dim, acc);
      }
      store_tile<NT>(acc, w.scale ? w.scale + c : nullptr, width, y + t, c);
    });
  }
}

// ---- Dense projections over row-major weights ------------------------------------------------------------------
// y [T, N] = x [T, K] W^T for W [N, K] as checkpoints store it (float32, bf16 or fp16: torch's own layout, so the
// same tensor serves torch's matmul for big batches). For decode-sized batches the cost is reading W once: a tile
// keeps NR weight rows times MT token rows of dot products in registers, loads each weight vector once for its MT
// rows, and sums each dot product horizontally once, at the end of K. Threads split the weight rows in blocks.
constexpr int kDotTokens = 4;  // MT of a full tile
// Below this many multiply-adds a matmul runs on the calling thread: waking the pool costs more.
constexpr int64_t kSerialMacs = 1 << 16;
// NR per MT: what the registers hold besides the MT x vectors and one weight vector
constexpr int dot_weight_rows(int mt) {
#if defined(__AVX512F__)
  return mt == 4 ? 4 : 8;
#else
  return mt == 4 ? 2 : mt == 3 ? 3 : 4;
#endif
}
constexpr int64_t kDotBlock = 48;  // weight rows per thread work item: a multiple of every NR

template <typename W, int NR, int MT>
inline void dot_tile(const float* const* x, const W* const* w, int64_t k_dim, float* const* y) {
  Vec acc[MT][NR];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = vzero();
  int64_t k = 0;
  for (; k + kLanes <= k_dim; k += kLanes) {
    Vec xv[MT];
    for (int t = 0; t < MT; ++t) xv[t] = vload(x[t] + k);
    for (int r = 0; r < NR; ++r) {
      const Vec wv = load_vec(w[r] + k);
      for (int t = 0; t < MT; ++t) acc[t][r] = vfma(xv[t], wv, acc[t][r]);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NR; ++r) {
      float sum = hsum(acc[t][r]);
      for (int64_t kk = k; kk < k_dim; ++kk) sum += x[t][kk] * static_cast<float>(w[r][kk]);
      y[t][r] = sum;
    }
}

#if defined(__AVX512BF16__)
// dot_tile on bf16 activations (Bf16Rows: zero-padded to whole vectors) and bf16 weights: 32 products an instruction.
template <int NR, int MT>
inline void dot_tile_bf16(const uint32_t* const* x, const c10::BFloat16* const* w, int64_t k_dim, float* const* y) {
  Vec acc[MT][NR];
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = vzero();
  int64_t k = 0;
  for (; k + 32 <= k_dim; k += 32) {
    __m512bh xv[MT];
    for (int t = 0; t < MT; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x[t] + k / 2);
    for (int r = 0; r < NR; ++r) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w[r] + k);
      for (int t = 0; t < MT; ++t) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv[t], wv);
    }
  }
  if (k < k_dim) {  // past K the weights load as zeros, not the next row
    const __mmask32 valid = (__mmask32{1} << (k_dim - k)) - 1;
    __m512bh xv[MT];
    for (int t = 0; t < MT; ++t) xv[t] = (__m512bh)_mm512_loadu_si512(x[t] + k / 2);
    for (int r = 0; r < NR; ++r) {
      const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(valid, w[r] + k);
      for (int t = 0; t < MT; ++t) acc[t][r] = _mm512_dpbf16_ps(acc[t][r], xv[t], wv);
    }
  }
  for (int t = 0; t < MT; ++t)
    for (int r = 0; r < NR; ++r) y[t][r] = hsum(acc[t][r]);
}
#endif

// One tile of dot_rows_block: float activations (X = float) or bf16 pairs (X = uint32_t, Bf16Rows, bf16 weights).
template <typename X, typename W, int NR, int MT>
inline void any_dot_tile(const X* const* x, const W* const* w, int64_t k_dim, float* const* y) {
#if defined(__AVX512BF16__)
  if constexpr (std::is_same<X, uint32_t>::value) {
    dot_tile_bf16<NR, MT>(x, w, k_dim, y);
    return;
  }
#endif
  if constexpr (std::is_same<X, float>::value) dot_tile<W, NR, MT>(x, w, k_dim, y);
}

// Weight rows [n0, n1) for every token row, in NR-row weight tiles (the block's last rows one at a time) and token
// tiles of up to kDotTokens rows. Few token rows (x fits in L1): each weight tile goes through every token tile while
// it sits in L1, so weights stream from memory once. Many: each token tile goes through the whole block, which sits
// in L2, while x streams once.
constexpr int64_t kDotWeightsOuterMaxTokens = 32;

template <typename X, typename W, int NR>
void dot_rows_block(const X* const* x, int64_t t_dim, const W* w, int64_t k_dim, int64_t n0, int64_t n1,
                    float* const* y) {
  const auto tile = [&](int64_t n, int64_t t) {
    const int nr = n + NR <= n1 ? NR : 1;
    const W* rows[NR];
    float* outs[kDotTokens];
    for (int r = 0; r < nr; ++r) rows[r] = w + (n + r) * k_dim;
    const int64_t mt = std::min<int64_t>(kDotTokens, t_dim - t);
    for (int64_t i = 0; i < mt; ++i) outs[i] = y[t + i] + n;
    with_rows<kDotTokens>(mt, [&](auto tokens) {
      constexpr int MT = decltype(tokens)::value;
      if (nr == NR) {
        any_dot_tile<X, W, NR, MT>(x + t, rows, k_dim, outs);
      } else {
        any_dot_tile<X, W, 1, MT>(x + t, rows, k_dim, outs);
      }
    });
    return nr;
  };
  if (t_dim <= kDotWeightsOuterMaxTokens) {
    for (int64_t n = n0; n < n1;) {
      int nr = 1;
      for (int64_t t = 0; t < t_dim; t += kDotTokens) nr = tile(n, t);
      n += nr;
    }
  } else {
    for (int64_t t = 0; t < t_dim; t += kDotTokens)
      for (int64_t n = n0; n < n1;) n += tile(n, t);
  }
}

template <typename W>
void linear_rows(const float* x, int64_t x_stride, int64_t t_dim, const W* w, int64_t n_dim, int64_t k_dim,
                 float* y) {
  const int64_t blocks = (n_dim + kDotBlock - 1) / kDotBlock;
  const int64_t macs = t_dim * n_dim * k_dim;
  std::vector<const float*> xs(t_dim);
  std::vector<float*> ys(t_dim);
  for (int64_t t = 0; t < t_dim; ++t) {
    xs[t] = x + t * x_stride;
    ys[t] = y + t * n_dim;
  }
  constexpr bool dot = kBf16Dot && std::is_same<W, c10::BFloat16>::value;
  const Bf16Rows pairs(xs.data(), dot ? t_dim : 0, k_dim);
  at::parallel_for(0, blocks, macs < kSerialMacs ? blocks : 1, [&](int64_t begin, int64_t end) {
    const int64_t n0 = begin * kDotBlock, n1 = std::min(n_dim, end * kDotBlock);
    // NR from the first token tile's size: fewer token rows leave registers for more weight rows
    with_rows<kDotTokens>(std::min<int64_t>(kDotTokens, t_dim), [&](auto tokens) {
      constexpr int NR = dot_weight_rows(decltype(tokens)::value);
      if constexpr (dot) {
        dot_rows_block<uint32_t, W, NR>(pairs.rows.data(), t_dim, w, k_dim, n0, n1, ys.data());
      } else {
        dot_rows_block<float, W, NR>(xs.data(), t_dim, w, k_dim, n0, n1, ys.data());
      }
    });
  });
}

void check_cpu_float(const torch::Tensor& t, const char* name, int64_t dims) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dims, got ", t.dim());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

}  // namespace

// RMSNorm over the last axis, as transformers' Mixtral/Qwen RMSNorm in float32: w * (x * rsqrt(mean(x^2) + eps)).
torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps) {
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "rms_norm: x must be a contiguous float32 CPU tensor");
  check_cpu_float(weight, "rms_norm weight", 1);
  const int64_t d = weight.size(0);
  TORCH_CHECK(x.size(-1) == d, "rms_norm: last axis ", x.size(-1), " != weight size ", d);
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rows = d ? x.numel() / d : 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = xp + r * d;
    float* orow = op + r * d;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < d; ++i) sum += xr[i] * xr[i];
    const float inv = 1.0f / std::sqrt(sum / static_cast<float>(d) + static_cast<float>(eps));
#pragma omp simd
    for (int64_t i = 0; i < d; ++i) orow[i] = wp[i] * (xr[i] * inv);
  }
  return out;
}

namespace {

// Decode attention over the paged pool [S, 2, KVH, Hd] of KV (float32 or bf16) elements and each sequence's key
// slots [B, len]: no copy, rows read where they are; out [B, H, Hd] float32.
template <typename KV>
void paged_attention(const float* qp, int64_t q_row, const KV* pages, const int64_t* slots, const int64_t* pos,
                     int64_t b, int64_t h, int64_t kvh, int64_t len, int64_t hd, int64_t window, float sc,
                     float* op) {
  const int64_t groups = h / kvh;
  // keys (kv 0) or values (kv 1) of sequence s and one kv head, from key `first` on
  const auto rows = [=](int64_t s, int64_t kv_head, int64_t kv, int64_t first) {
    return SlotRows<KV>{pages + (kv * kvh + kv_head) * hd, slots + s * len + first, 2 * kvh * hd};
  };
  at::parallel_for(0, b * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * len);
    std::vector<const float*> probs(groups), qs(groups);
    std::vector<float*> outs(groups), score_ptrs(groups);
    for (int64_t g = 0; g < groups; ++g) score_ptrs[g] = scores.data() + g * len;
    for (int64_t bk = begin; bk < end; ++bk) {  // the G query heads of one kv head share its keys and values
      const int64_t s = bk / kvh, kv_head = bk % kvh;
      const int64_t last = pos[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t n = last - first + 1;
      const auto keys = rows(s, kv_head, 0, first);
      const auto values = rows(s, kv_head, 1, first);
      for (int64_t g = 0; g < groups; ++g) qs[g] = qp + s * q_row + (kv_head * groups + g) * hd;
      score_rows<KV>(qs.data(), groups, keys, n, hd, score_ptrs.data());
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t head = kv_head * groups + g;
        float* sc_row = score_ptrs[g];
        float max_score = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : max_score)
        for (int64_t j = 0; j < n; ++j) max_score = sc_row[j] > max_score ? sc_row[j] : max_score;
        const float shift = max_score * sc;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) sc_row[j] = exp_poly(sc_row[j] * sc - shift);
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t j = 0; j < n; ++j) total += sc_row[j];
        const float inv = 1.0f / total;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) sc_row[j] *= inv;
        probs[g] = sc_row;
        outs[g] = op + (s * h + head) * hd;
      }
      gemm_rows<KV>(probs.data(), groups, values, n, hd, outs.data());  // out[g] = sum_j p[g][j] v[j]
    }
  });
}

}  // namespace

// One query per decoding sequence over the paged pool: q [B, H, Hd] float32 (any token stride), pages
// [S, 2, KVH, Hd] (one layer, K then V; float32 or bf16, widened as it loads), slots [B, L] int64 (slot of each
// sequence's key j; entries past its position are not read), positions [B] (the query's position; keys
// 0..position are its sequence's, key j at position j); window > 0 keeps keys with j > position - window
// (transformers' sliding-window rule). -> [B, H, Hd] float32; scores, softmax and sums in float32. Shared prefix
// blocks are read where they are, so no sequence needs a private copy of its keys.
torch::Tensor paged_decode_attention(const torch::Tensor& q, const torch::Tensor& pages, const torch::Tensor& slots,
                                     const torch::Tensor& positions, int64_t window, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kFloat32 && q.dim() == 3, "q must be float32 [B, H, Hd]");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q's heads must be contiguous within a token");
  TORCH_CHECK(pages.device().is_cpu() && pages.dim() == 4 && pages.is_contiguous() && pages.size(1) == 2 &&
                  (pages.scalar_type() == torch::kFloat32 || pages.scalar_type() == torch::kBFloat16),
              "pages must be a contiguous float32 or bfloat16 [S, 2, KVH, Hd] CPU tensor, got ", pages.scalar_type(),
              " ", pages.sizes());
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.dim() == 2 && slots.is_contiguous(),
              "slots must be a contiguous int64 [B, L] tensor");
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.dim() == 1 && positions.is_contiguous(),
              "positions must be a contiguous int64 vector");
  const int64_t b = q.size(0), h = q.size(1), hd = q.size(2);
  const int64_t kvh = pages.size(2), len = slots.size(1), num_slots = pages.size(0);
  TORCH_CHECK(pages.size(3) == hd && h % kvh == 0, "pages ", pages.sizes(), " do not fit q ", q.sizes());
  TORCH_CHECK(slots.size(0) == b && positions.size(0) == b, "slots ", slots.sizes(), " and positions ",
              positions.sizes(), " need one row per sequence of q ", q.sizes());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t s = 0; s < b; ++s) {
    TORCH_CHECK(pos[s] >= 0 && pos[s] < len, "position ", pos[s], " outside the slots of sequence ", s);
    for (int64_t j = 0; j <= pos[s]; ++j)
      TORCH_CHECK(sp[s * len + j] >= 0 && sp[s * len + j] < num_slots, "slot ", sp[s * len + j], " of sequence ", s,
                  " outside the pages");
  }
  auto out = torch::empty({b, h, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  if (pages.scalar_type() == torch::kFloat32) {
    paged_attention(qp, q.stride(0), pages.data_ptr<float>(), sp, pos, b, h, kvh, len, hd, window, sc, op);
  } else {
    paged_attention(qp, q.stride(0), static_cast<const c10::BFloat16*>(pages.data_ptr()), sp, pos, b, h, kvh, len,
                    hd, window, sc, op);
  }
  return out;
}

namespace {

// Gate: logits [E] = router [E, D] x, then top-k (ties to the lower expert id) and the family's combine weights.
void route(const float* x, const float* router, int64_t e, int64_t d, int64_t top_k, bool norm_topk_prob,
           int64_t* experts, float* weights, float* logits) {
  for (int64_t i = 0; i < e; ++i) {
    const float* r = router + i * d;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t k = 0; k < d; ++k) dot += x[k] * r[k];
    logits[i] = dot;
  }
  const float max_logit = *std::max_element(logits, logits + e);
  for (int64_t a = 0; a < top_k; ++a) {
    int64_t best = -1;
    for (int64_t i = 0; i < e; ++i) {
      bool taken = false;
      for (int64_t b = 0; b < a; ++b) taken |= experts[b] == i;
      if (!taken && (best < 0 || logits[i] > logits[best])) best = i;
    }
    experts[a] = best;
  }
  // Mixtral / norm_topk_prob: softmax over the top-k logits (= renormalised top-k probabilities); else the
  // top-k entries of the softmax over all experts.
  float total = 0.0f;
  if (norm_topk_prob) {
    for (int64_t a = 0; a < top_k; ++a) total += (weights[a] = std::exp(logits[experts[a]] - max_logit));
  } else {
    for (int64_t i = 0; i < e; ++i) total += std::exp(logits[i] - max_logit);
    for (int64_t a = 0; a < top_k; ++a) weights[a] = std::exp(logits[experts[a]] - max_logit);
  }
  for (int64_t a = 0; a < top_k; ++a) weights[a] /= total;
}

// One stacked expert matrix argument: [E, P, K, 32] (int4: [E, P, K, 16] bytes) panels of [K, N] per expert, with
// its scales, checked.
struct StackedWeight {
  Format format;
  const uint8_t* data;
  int64_t expert_bytes;
  const float* scale = nullptr;
  int64_t scale_stride = 0;
  const float* offset = nullptr;
  int64_t group;

  StackedWeight(const char* name, const torch::Tensor& w, const c10::optional<torch::Tensor>& s,
                const c10::optional<torch::Tensor>& o, int64_t group_size, int64_t e, int64_t k, int64_t n)
      : group(group_size) {
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 4, name, " must be contiguous [E, P, K, 32] CPU panels");
    switch (w.scalar_type()) {
      case torch::kFloat32: format = Format::kFloat; break;
      case torch::kBFloat16: format = Format::kBFloat16; break;
      case torch::kFloat16: format = Format::kHalf; break;
      case torch::kInt8: format = Format::kInt8; break;
      case torch::kUInt8: format = Format::kInt4; break;
      default: TORCH_CHECK(false, name, " must be float32, bfloat16, float16, int8 or uint8 (int4 pairs), got ", w.scalar_type());
    }
    const int64_t panels = (n + kPanel - 1) / kPanel, n_pad = panels * kPanel;
    const int64_t row = format == Format::kInt4 ? kPanel / 2 : kPanel;
    TORCH_CHECK(w.size(0) == e && w.size(1) == panels && w.size(2) == k && w.size(3) == row, name, " has shape ",
                w.sizes(), ", expected [", e, ", ", panels, ", ", k, ", ", row, "] (panels of ", n, " columns)");
    data = static_cast<const uint8_t*>(w.data_ptr());
    expert_bytes = panels * k * row * static_cast<int64_t>(w.element_size());
    if (format == Format::kInt8) {
      TORCH_CHECK(s, name, ": int8 experts need per-column scales");
      check_cpu_float(*s, "int8 scales", 2);
      TORCH_CHECK(s->size(0) == e && s->size(1) == n_pad, name, " scales have shape ", s->sizes(), ", expected [", e, ", ", n_pad, "]");
      scale = s->data_ptr<float>();
      scale_stride = n_pad;
    } else if (format == Format::kInt4) {
      TORCH_CHECK(s && o, name, ": int4 experts need group scales and offsets");
      TORCH_CHECK(group_size > 0 && k % group_size == 0, name, ": group size ", group_size, " does not divide ", k);
      check_cpu_float(*s, "int4 scales", 3);
      check_cpu_float(*o, "int4 offsets", 3);
      TORCH_CHECK(s->sizes() == o->sizes() && s->size(0) == e && s->size(1) == k / group_size && s->size(2) == n_pad,
                  name, " scales have shape ", s->sizes(), ", expected [", e, ", ", k / group_size, ", ", n_pad, "]");
      scale = s->data_ptr<float>();
      offset = o->data_ptr<float>();
      scale_stride = (k / group_size) * n_pad;
    }
  }

  Weight expert(int64_t ex) const {
    return {format, data + ex * expert_bytes, scale ? scale + ex * scale_stride : nullptr,
            offset ? offset + ex * scale_stride : nullptr, group};
  }
};


// Rows first .. first + rows (of the caller's row arrays) go through expert `expert`.
struct RowGroup {
  int64_t expert, first, rows;
};

// Each group's rows times its expert's matrix [K, N] -> outs, split over threads by (group, panel).
// sums: int4's per-group row sums (else unused); dot: the rows for the dot-product path (DotInput), or empty.
void expert_matmuls(const StackedWeight& w, const std::vector<RowGroup>& groups, const float* const* rows,
                    const float* const* sums, DotRows dot, int64_t k_dim, int64_t n_dim, float* const* outs) {
  const int64_t panels = (n_dim + kPanel - 1) / kPanel;
  const int64_t items = static_cast<int64_t>(groups.size()) * panels;
  int64_t total_rows = 0;
  for (const RowGroup& g : groups) total_rows += g.rows;
  const int64_t macs = total_rows * k_dim * n_dim;
  at::parallel_for(0, items, macs < kSerialMacs ? items : 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scratch;
    for (int64_t item = begin; item < end; ++item) {
      const RowGroup& g = groups[item / panels];
      if (w.format != Format::kFloat && !dot.rows && g.rows > kMaxRows) scratch.resize(k_dim * kPanel);
      gemm_panel(rows + g.first, sums + g.first, dot.from(g.first), g.rows, w.expert(g.expert), k_dim, n_dim,
                 item % panels, outs + g.first, scratch.data());
    }
  });
}

// Per row and group of `group` entries, the entries' sum (int4's offset term); rows by slot.
std::vector<const float*> group_sums(const std::vector<const float*>& rows, int64_t k_dim, int64_t group,
                                     std::vector<float>& storage) {
  const int64_t groups = k_dim / group, n = static_cast<int64_t>(rows.size());
  storage.resize(n * groups);
  std::vector<const float*> sums(n);
  for (int64_t j = 0; j < n; ++j) {
    float* s = storage.data() + j * groups;
    for (int64_t g = 0; g < groups; ++g) {
      const float* r = rows[j] + g * group;
      float total = 0.0f;
#pragma omp simd reduction(+ : total)
      for (int64_t k = 0; k < group; ++k) total += r[k];
      s[g] = total;
    }
    sums[j] = s;
  }
  return sums;
}

// The experts' SwiGLU FFN, silu(x W_gate) * (x W_up) W_down, for rows grouped by expert: x_rows[j] [D] ->
// out_rows[j] [D].
void expert_ffn(const StackedWeight& gate_up, const StackedWeight& down, const std::vector<RowGroup>& groups,
                const std::vector<const float*>& x_rows, int64_t d, int64_t inter, int64_t group_size,
                const std::vector<float*>& out_rows) {
  const int64_t n = static_cast<int64_t>(x_rows.size()), two_i = 2 * inter;
  std::vector<float> hidden(n * two_i);
  std::vector<float*> hidden_rows(n);
  std::vector<const float*> act_rows(n);
  for (int64_t j = 0; j < n; ++j) act_rows[j] = hidden_rows[j] = hidden.data() + j * two_i;
  const bool int4 = gate_up.format == Format::kInt4;
  std::vector<float> sum_storage;
  std::vector<const float*> sums(n, nullptr);
  if (int4) sums = group_sums(x_rows, d, group_size, sum_storage);
  const DotInput x_dot(gate_up.format, x_rows.data(), n, d);
  expert_matmuls(gate_up, groups, x_rows.data(), sums.data(), x_dot.view, d, two_i, hidden_rows.data());
  for (float* g : hidden_rows) {  // silu(gate) * up, into the first I entries
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) g[i] = g[i] / (1.0f + exp_poly(-g[i])) * g[inter + i];
  }
  if (int4) sums = group_sums(act_rows, inter, group_size, sum_storage);
  const DotInput act_dot(down.format, act_rows.data(), n, inter);
  expert_matmuls(down, groups, act_rows.data(), sums.data(), act_dot.view, inter, d, out_rows.data());
}

}  // namespace

// Routed MoE for x [T, D]: gate (router [E, D], top_k, norm_topk_prob), every token through its top-k experts'
// SwiGLU FFN, weighted sum -> [T, D]. Expert weights in column panels (see above; moe_serve/kernels/layout.py):
// w13 [E, P, D, 32] for [D, 2I] (gate columns then up columns), w2 [E, P, I, 32] for [I, D]; float32, int8 with
// per-column scales s [E, P 32], or int4 ([E, P, K, 16] bytes) with group scales and offsets [E, K/G, P 32].
torch::Tensor moe_experts(const torch::Tensor& x, const torch::Tensor& router, int64_t top_k, bool norm_topk_prob,
                          const torch::Tensor& w13, const c10::optional<torch::Tensor>& s13,
                          const c10::optional<torch::Tensor>& o13, const torch::Tensor& w2,
                          const c10::optional<torch::Tensor>& s2, const c10::optional<torch::Tensor>& o2,
                          int64_t group_size) {
  check_cpu_float(x, "x", 2);
  check_cpu_float(router, "router", 2);
  const int64_t t = x.size(0), d = x.size(1), e = router.size(0);
  TORCH_CHECK(router.size(1) == d, "router is ", router.sizes(), " for hidden size ", d);
  TORCH_CHECK(top_k >= 1 && top_k <= e, "top_k ", top_k, " out of range for ", e, " experts");
  TORCH_CHECK(w2.dim() == 4, "w2 must be [E, P, I, 32] panels");
  const int64_t inter = w2.size(2);
  const StackedWeight gate_up("w13", w13, s13, o13, group_size, e, d, 2 * inter);
  const StackedWeight down("w2", w2, s2, o2, group_size, e, inter, d);
  TORCH_CHECK(gate_up.format == down.format, "w13 and w2 must share a format");

  const float* xp = x.data_ptr<float>();
  const int64_t pairs = t * top_k;
  std::vector<int64_t> experts(pairs);
  std::vector<float> weights(pairs), logits(e);
  for (int64_t i = 0; i < t; ++i) {
    route(xp + i * d, router.data_ptr<float>(), e, d, top_k, norm_topk_prob, experts.data() + i * top_k,
          weights.data() + i * top_k, logits.data());
  }
  // routing pairs grouped by expert: slots start[e] .. start[e + 1] are expert e's
  std::vector<int64_t> start(e + 1, 0), fill(e);
  for (int64_t p = 0; p < pairs; ++p) ++start[experts[p] + 1];
  for (int64_t i = 0; i < e; ++i) start[i + 1] += start[i];
  std::copy(start.begin(), start.end() - 1, fill.begin());
  std::vector<RowGroup> groups;
  for (int64_t i = 0; i < e; ++i)
    if (start[i + 1] > start[i]) groups.push_back({i, start[i], start[i + 1] - start[i]});
  std::vector<float> contrib(pairs * d);  // by routing pair
  std::vector<const float*> x_rows(pairs);
  std::vector<float*> out_rows(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t slot = fill[experts[p]]++;
    x_rows[slot] = xp + (p / top_k) * d;
    out_rows[slot] = contrib.data() + p * d;
  }
  expert_ffn(gate_up, down, groups, x_rows, d, inter, group_size, out_rows);

  auto result = torch::zeros({t, d}, x.options());
  float* rp = result.data_ptr<float>();
  for (int64_t i = 0; i < t; ++i) {  // combine in routing order, as the torch paths sum
    float* r = rp + i * d;
    for (int64_t a = 0; a < top_k; ++a) {
      const float wgt = weights[i * top_k + a];
      const float* c = contrib.data() + (i * top_k + a) * d;
#pragma omp simd
      for (int64_t k = 0; k < d; ++k) r[k] += wgt * c[k];
    }
  }
  return result;
}

// The experts' FFN outputs (no gate, no combine) for rows already grouped by expert: x [N, D], counts[i] rows for
// expert expert_ids[i] (an index into the stacked weights, as in moe_experts) in order -> [N, D]. An expert shard's
// call: the router gates, groups and combines.
torch::Tensor grouped_experts(const torch::Tensor& x, const torch::Tensor& expert_ids, const torch::Tensor& counts,
                              const torch::Tensor& w13, const c10::optional<torch::Tensor>& s13,
                              const c10::optional<torch::Tensor>& o13, const torch::Tensor& w2,
                              const c10::optional<torch::Tensor>& s2, const c10::optional<torch::Tensor>& o2,
                              int64_t group_size) {
  check_cpu_float(x, "x", 2);
  TORCH_CHECK(expert_ids.scalar_type() == torch::kInt64 && counts.scalar_type() == torch::kInt64 &&
                  expert_ids.dim() == 1 && expert_ids.is_contiguous() && counts.is_contiguous() &&
                  counts.sizes() == expert_ids.sizes(),
              "expert_ids and counts must be contiguous int64 vectors of one length");
  TORCH_CHECK(w13.dim() == 4 && w2.dim() == 4, "w13 and w2 must be [E, P, K, 32] panels");
  const int64_t n = x.size(0), d = x.size(1), e = w13.size(0), inter = w2.size(2);
  const StackedWeight gate_up("w13", w13, s13, o13, group_size, e, d, 2 * inter);
  const StackedWeight down("w2", w2, s2, o2, group_size, e, inter, d);
  TORCH_CHECK(gate_up.format == down.format, "w13 and w2 must share a format");
  const int64_t* ids = expert_ids.data_ptr<int64_t>();
  const int64_t* rows = counts.data_ptr<int64_t>();
  std::vector<RowGroup> groups;
  int64_t first = 0;
  for (int64_t i = 0; i < expert_ids.size(0); ++i) {
    TORCH_CHECK(ids[i] >= 0 && ids[i] < e, "expert index ", ids[i], " out of range for ", e, " experts");
    TORCH_CHECK(rows[i] >= 0, "negative row count ", rows[i]);
    if (rows[i] > 0) groups.push_back({ids[i], first, rows[i]});
    first += rows[i];
  }
  TORCH_CHECK(first == n, "counts sum to ", first, " rows, x has ", n);
  auto out = torch::empty({n, d}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::vector<const float*> x_rows(n);
  std::vector<float*> out_rows(n);
  for (int64_t j = 0; j < n; ++j) {
    x_rows[j] = xp + j * d;
    out_rows[j] = op + j * d;
  }
  expert_ffn(gate_up, down, groups, x_rows, d, inter, group_size, out_rows);
  return out;
}

// x [T, K] float32 (rows may be strided, elements contiguous) times W [N, K] (float32, bfloat16 or float16,
// contiguous) transposed -> [T, N] float32: a projection for decode-sized batches (see "Dense projections").
torch::Tensor linear(const torch::Tensor& x, const torch::Tensor& w) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1,
              "linear: x must be a 2-D float32 CPU tensor with contiguous rows");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), "linear: w must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(w.size(1) == x.size(1), "linear: x has ", x.size(1), " features, w ", w.sizes());
  const int64_t t = x.size(0), n = w.size(0), k = w.size(1);
  auto out = torch::empty({t, n}, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  switch (w.scalar_type()) {
    case torch::kFloat32: linear_rows(xp, x.stride(0), t, w.data_ptr<float>(), n, k, op); break;
    case torch::kBFloat16:
      linear_rows(xp, x.stride(0), t, static_cast<const c10::BFloat16*>(w.data_ptr()), n, k, op);
      break;
    case torch::kFloat16: linear_rows(xp, x.stride(0), t, static_cast<const c10::Half*>(w.data_ptr()), n, k, op); break;
    default: TORCH_CHECK(false, "linear: w must be float32, bfloat16 or float16, got ", w.scalar_type());
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The kernels touch no Python object: they let go of the GIL, so the serving process's other threads (its event
  // loop streaming tokens, detokenizing) run while a step computes, instead of waiting for it.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("rms_norm", &rms_norm, "RMSNorm over the last axis (float32)", no_gil);
  m.def("linear", &linear, "x W^T over row-major float32/bf16/fp16 weights, for decode-sized batches", no_gil);
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV pool", no_gil);
  m.def("moe_experts", &moe_experts, "gate + routed experts + combine, over column panels", no_gil);
  m.def("grouped_experts", &grouped_experts, "expert FFNs for rows grouped by expert, over column panels", no_gil);
  // true where bf16 weights meet activations rounded to bf16 (AVX512-BF16 dot products), not widened
  m.attr("bf16_dot") = kBf16Dot;
  // true where int8 experts meet activations quantized to int8 per row (AVX512-VNNI dot products)
  m.attr("int8_dot") = kInt8Dot;
}
