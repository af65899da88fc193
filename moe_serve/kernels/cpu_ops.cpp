// CPU kernels for the decode hot path of small and mid-size MoE models, where eager PyTorch spends most of a
// step in per-op overhead rather than arithmetic. Built at first use by moe_serve/kernels/__init__.py (torch's
// cpp_extension, -O3 -march=native); every kernel here has a torch reference in moe_serve/model that tests compare
// against, and that runs when the build is not available.
//
// Loops are written so that gcc vectorizes them (`#pragma omp simd`, compiled with -fopenmp-simd): innermost
// loops are unit-stride axpys or dot products over one row. exp is a polynomial (see exp_poly) because libm's expf
// does not vectorize; it agrees with torch's exp to a few ulp.
//
// Shape legend: T tokens, D hidden, E experts, A experts per token, I expert width, B decoding sequences,
// H query heads, KVH key/value heads, G = H / KVH, Lc workspace capacity, Hd head dim.

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// dots[j] = <q, keys[j]> for j in [0, n), keys [n, hd] row-major; 8 keys at a time share one horizontal sum.
inline void dot_rows(const float* q, const float* keys, int64_t n, int64_t hd, float* dots) {
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  if (hd % 8 == 0) {
    for (; j + 8 <= n; j += 8) {
      __m256 acc[8];
      for (int u = 0; u < 8; ++u) acc[u] = _mm256_setzero_ps();
      for (int64_t i = 0; i < hd; i += 8) {
        const __m256 qv = _mm256_loadu_ps(q + i);
        for (int u = 0; u < 8; ++u) acc[u] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + (j + u) * hd + i), acc[u]);
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
    const float* k = keys + j * hd;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < hd; ++i) dot += q[i] * k[i];
    dots[j] = dot;
  }
}

// y[t, 0..N) = sum_k x[t][k] * wt[k, 0..N) for NT rows x[t] (each K long): register-blocked, weight-stationary.
#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#endif

// y[t][0..N) = sum_k x[t][k] * wt[k][0..N) for NT rows: register-blocked, each weight row read once per tile.
template <typename W, int NT>
inline void gemm_tile(const float* const* x, const W* __restrict wt, int64_t k_dim, int64_t n_dim, float* const* y) {
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  for (; c + 32 <= n_dim; c += 32) {
    __m256 acc[NT][4];
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < 4; ++u) acc[t][u] = _mm256_setzero_ps();
    for (int64_t k = 0; k < k_dim; ++k) {
      const W* w = wt + k * n_dim + c;
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
      const __m256 w0 = load8(wt + k * n_dim + c);
      for (int t = 0; t < NT; ++t) acc[t] = _mm256_fmadd_ps(_mm256_set1_ps(x[t][k]), w0, acc[t]);
    }
    for (int t = 0; t < NT; ++t) _mm256_storeu_ps(y[t] + c, acc[t]);
  }
#endif
  for (; c < n_dim; ++c) {
    for (int t = 0; t < NT; ++t) {
      float s = 0.0f;
      for (int64_t k = 0; k < k_dim; ++k) s += x[t][k] * static_cast<float>(wt[k * n_dim + c]);
      y[t][c] = s;
    }
  }
}

template <typename W>
void gemm_rows(const float* const* x, int64_t n, const W* wt, int64_t k_dim, int64_t n_dim, float* const* y) {
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) gemm_tile<W, 4>(x + t, wt, k_dim, n_dim, y + t);
  switch (n - t) {
    case 3: gemm_tile<W, 3>(x + t, wt, k_dim, n_dim, y + t); break;
    case 2: gemm_tile<W, 2>(x + t, wt, k_dim, n_dim, y + t); break;
    case 1: gemm_tile<W, 1>(x + t, wt, k_dim, n_dim, y + t); break;
    default: break;
  }
}

// int4: row k of wt holds N/2 bytes, column c in the low (c even) or high (c odd) nibble of byte c/2, and
// w[k][c] = q * scale[k / G][c] + offset[k / G][c] (offset = zero - 8 scale, folded at packing). Per group of G
// rows the tile sums x q, then scales once: y += scale * sum_k(x q) + offset * sum_k(x).
template <int NT>
inline void gemm_tile_int4(const float* const* x, const uint8_t* __restrict wt, const float* scale,
                           const float* offset, int64_t group, int64_t k_dim, int64_t n_dim, float* const* y) {
  const int64_t row_bytes = n_dim / 2;
  int64_t c = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m128i low_nibbles = _mm_set1_epi8(0x0F);
  for (; c + 32 <= n_dim; c += 32) {
    __m256 acc[NT][4];
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < 4; ++u) acc[t][u] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < k_dim; g0 += group) {
      __m256 part[NT][4];
      float xsum[NT];
      for (int t = 0; t < NT; ++t) {
        xsum[t] = 0.0f;
        for (int u = 0; u < 4; ++u) part[t][u] = _mm256_setzero_ps();
      }
      for (int64_t k = g0; k < g0 + group; ++k) {
        const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(wt + k * row_bytes + c / 2));
        const __m128i lo = _mm_and_si128(bytes, low_nibbles);
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), low_nibbles);
        const __m128i first = _mm_unpacklo_epi8(lo, hi), second = _mm_unpackhi_epi8(lo, hi);  // columns in order
        const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(first));
        const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(first, 8)));
        const __m256 w2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(second));
        const __m256 w3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(second, 8)));
        for (int t = 0; t < NT; ++t) {
          const float xk = x[t][k];
          const __m256 xv = _mm256_set1_ps(xk);
          xsum[t] += xk;
          part[t][0] = _mm256_fmadd_ps(xv, w0, part[t][0]);
          part[t][1] = _mm256_fmadd_ps(xv, w1, part[t][1]);
          part[t][2] = _mm256_fmadd_ps(xv, w2, part[t][2]);
          part[t][3] = _mm256_fmadd_ps(xv, w3, part[t][3]);
        }
      }
      const float* sg = scale + (g0 / group) * n_dim + c;
      const float* og = offset + (g0 / group) * n_dim + c;
      for (int u = 0; u < 4; ++u) {
        const __m256 sv = _mm256_loadu_ps(sg + 8 * u), ov = _mm256_loadu_ps(og + 8 * u);
        for (int t = 0; t < NT; ++t) {
          acc[t][u] = _mm256_fmadd_ps(sv, part[t][u], _mm256_fmadd_ps(_mm256_set1_ps(xsum[t]), ov, acc[t][u]));
        }
      }
    }
    for (int t = 0; t < NT; ++t)
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(y[t] + c + 8 * u, acc[t][u]);
  }
#endif
  for (; c < n_dim; ++c) {
    for (int t = 0; t < NT; ++t) {
      float sum = 0.0f;
      for (int64_t k = 0; k < k_dim; ++k) {
        const uint8_t byte = wt[k * row_bytes + c / 2];
        const float q = static_cast<float>(c % 2 ? byte >> 4 : byte & 0x0F);
        const int64_t at = (k / group) * n_dim + c;
        sum += x[t][k] * (q * scale[at] + offset[at]);
      }
      y[t][c] = sum;
    }
  }
}

// The formats an expert matrix [K, N] comes in, in the kernel's layout (input rows, output columns).
enum class Format { kFloat, kInt8, kInt4 };

struct Weight {
  Format format;
  const void* data;
  const float* scale;   // int8: [N] per output column; int4: [K / G, N]
  const float* offset;  // int4: [K / G, N]
  int64_t group;        // int4: G
};

// y[j] = x[j] W for n rows (K long each) -> N columns.
void gemm(const float* const* x, int64_t n, const Weight& w, int64_t k_dim, int64_t n_dim, float* const* y) {
  if (w.format == Format::kFloat) {
    gemm_rows<float>(x, n, static_cast<const float*>(w.data), k_dim, n_dim, y);
    return;
  }
  if (w.format == Format::kInt8) {
    gemm_rows<int8_t>(x, n, static_cast<const int8_t*>(w.data), k_dim, n_dim, y);
    for (int64_t j = 0; j < n; ++j) {
#pragma omp simd
      for (int64_t i = 0; i < n_dim; ++i) y[j][i] *= w.scale[i];
    }
    return;
  }
  const auto* bytes = static_cast<const uint8_t*>(w.data);
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) gemm_tile_int4<4>(x + t, bytes, w.scale, w.offset, w.group, k_dim, n_dim, y + t);
  switch (n - t) {
    case 3: gemm_tile_int4<3>(x + t, bytes, w.scale, w.offset, w.group, k_dim, n_dim, y + t); break;
    case 2: gemm_tile_int4<2>(x + t, bytes, w.scale, w.offset, w.group, k_dim, n_dim, y + t); break;
    case 1: gemm_tile_int4<1>(x + t, bytes, w.scale, w.offset, w.group, k_dim, n_dim, y + t); break;
    default: break;
  }
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

// One query per decoding sequence over the decode workspace: q [B, H, Hd] (any token stride), workspace [B, 2, KVH, Lc, Hd] (K then V),
// positions [B] (the query's position; keys 0..position are its sequence's, key j at position j); window > 0
// keeps keys with j > position - window (transformers' sliding-window rule). -> [B, H, Hd]
torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& workspace, const torch::Tensor& positions,
                               int64_t window, double scale) {
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == torch::kFloat32 && q.dim() == 3, "q must be float32 [B, H, Hd]");
  TORCH_CHECK(q.stride(2) == 1 && q.stride(1) == q.size(2), "q's heads must be contiguous within a token");
  check_cpu_float(workspace, "workspace", 5);
  TORCH_CHECK(positions.scalar_type() == torch::kInt64 && positions.dim() == 1 && positions.is_contiguous(),
              "positions must be a contiguous int64 vector");
  const int64_t b = q.size(0), h = q.size(1), hd = q.size(2);
  const int64_t kvh = workspace.size(2), cap = workspace.size(3);
  TORCH_CHECK(workspace.size(0) >= b && workspace.size(1) == 2 && workspace.size(4) == hd && h % kvh == 0,
              "workspace shape ", workspace.sizes(), " does not fit q ", q.sizes());
  TORCH_CHECK(positions.size(0) == b, "positions has ", positions.size(0), " entries for ", b, " sequences");
  const int64_t groups = h / kvh;
  auto out = torch::empty({b, h, hd}, q.options());
  const float* qp = q.data_ptr<float>();
  const int64_t q_row = q.stride(0);
  const float* wsp = workspace.data_ptr<float>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  for (int64_t s = 0; s < b; ++s) TORCH_CHECK(pos[s] >= 0 && pos[s] < cap, "position ", pos[s], " outside workspace");
  at::parallel_for(0, b * kvh, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(groups * cap);
    std::vector<const float*> probs(groups);
    std::vector<float*> outs(groups);
    for (int64_t bk = begin; bk < end; ++bk) {  // the G query heads of one kv head share its keys and values
      const int64_t s = bk / kvh, kv_head = bk % kvh;
      const int64_t last = pos[s];
      const int64_t first = window > 0 ? std::max<int64_t>(0, last - window + 1) : 0;
      const int64_t n = last - first + 1;
      const float* keys = wsp + ((s * 2 + 0) * kvh + kv_head) * cap * hd + first * hd;
      const float* values = wsp + ((s * 2 + 1) * kvh + kv_head) * cap * hd + first * hd;
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t head = kv_head * groups + g;
        float* sc_row = scores.data() + g * cap;
        dot_rows(qp + s * q_row + head * hd, keys, n, hd, sc_row);
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
      gemm_rows<float>(probs.data(), groups, values, n, hd, outs.data());  // out[g] = sum_j p[g][j] v[j]
    }
  });
  return out;
}

namespace {

// Experts' SwiGLU FFN for n routed rows of one expert: x[j] [D] -> out[j] [D] (before combine weights).
// w13: [D, 2I] (gate columns then up columns), w2: [I, D].
void expert_ffn(const float* const* x, int64_t n, int64_t d, int64_t inter, const Weight& w13, const Weight& w2,
                float* hidden /* [n, 2I] */, float* const* out) {
  const int64_t two_i = 2 * inter;
  std::vector<float*> gate_up(n);
  std::vector<const float*> act(n);
  for (int64_t j = 0; j < n; ++j) act[j] = gate_up[j] = hidden + j * two_i;
  gemm(x, n, w13, d, two_i, gate_up.data());
  for (int64_t j = 0; j < n; ++j) {
    float* g = gate_up[j];
#pragma omp simd
    for (int64_t i = 0; i < inter; ++i) g[i] = g[i] / (1.0f + exp_poly(-g[i])) * g[inter + i];  // silu(gate) * up
  }
  gemm(act.data(), n, w2, inter, d, out);  // rows of hidden: their first I entries
}

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

// One stacked expert matrix argument [E, K, N] (int4: [E, K, N/2] bytes) with its scales, checked.
struct StackedWeight {
  Format format;
  const uint8_t* data;
  int64_t expert_bytes;
  const float* scale;
  int64_t scale_stride;
  const float* offset;
  int64_t group;

  StackedWeight(const char* name, const torch::Tensor& w, const c10::optional<torch::Tensor>& s,
                const c10::optional<torch::Tensor>& o, int64_t group_size, int64_t e, int64_t k, int64_t n)
      : scale(nullptr), scale_stride(0), offset(nullptr), group(group_size) {
    TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.dim() == 3, name, " must be a contiguous [E, K, N] CPU tensor");
    const auto dtype = w.scalar_type();
    format = dtype == torch::kFloat32 ? Format::kFloat : dtype == torch::kInt8 ? Format::kInt8 : Format::kInt4;
    TORCH_CHECK(format != Format::kInt4 || dtype == torch::kUInt8, name, " must be float32, int8 or uint8 (int4 pairs), got ", dtype);
    const int64_t n_stored = format == Format::kInt4 ? n / 2 : n;
    TORCH_CHECK(w.size(0) == e && w.size(1) == k && w.size(2) == n_stored && (format != Format::kInt4 || n % 2 == 0),
                name, " has shape ", w.sizes(), ", expected [", e, ", ", k, ", ", n_stored, "]");
    data = static_cast<const uint8_t*>(w.data_ptr());
    expert_bytes = k * n_stored * static_cast<int64_t>(w.element_size());
    if (format == Format::kInt8) {
      TORCH_CHECK(s, name, ": int8 experts need per-column scales");
      check_cpu_float(*s, "int8 scales", 2);
      TORCH_CHECK(s->size(0) == e && s->size(1) == n, name, " scales have shape ", s->sizes(), ", expected [", e, ", ", n, "]");
      scale = s->data_ptr<float>();
      scale_stride = n;
    } else if (format == Format::kInt4) {
      TORCH_CHECK(s && o, name, ": int4 experts need group scales and offsets");
      TORCH_CHECK(group_size > 0 && k % group_size == 0, name, ": group size ", group_size, " does not divide ", k);
      check_cpu_float(*s, "int4 scales", 3);
      check_cpu_float(*o, "int4 offsets", 3);
      TORCH_CHECK(s->sizes() == o->sizes() && s->size(0) == e && s->size(1) == k / group_size && s->size(2) == n,
                  name, " scales have shape ", s->sizes(), ", expected [", e, ", ", k / group_size, ", ", n, "]");
      scale = s->data_ptr<float>();
      offset = o->data_ptr<float>();
      scale_stride = (k / group_size) * n;
    }
  }

  Weight expert(int64_t ex) const {
    return {format, data + ex * expert_bytes, scale ? scale + ex * scale_stride : nullptr,
            offset ? offset + ex * scale_stride : nullptr, group};
  }
};

}  // namespace

// Routed MoE for x [T, D]: gate (router [E, D], top_k, norm_topk_prob), every token through its top-k experts,
// weighted sum -> [T, D]. Expert weights transposed for weight-stationary loops: w13t [E, D, 2I] (gate then up
// columns), w2t [E, I, D], in one of three formats: float32; int8 with per-column scales s [E, N]; int4 as uint8
// pairs [E, K, N/2] with group scales and offsets [E, K/G, N] (w = q * scale + offset, G = group_size).
torch::Tensor moe_experts(const torch::Tensor& x, const torch::Tensor& router, int64_t top_k, bool norm_topk_prob,
                          const torch::Tensor& w13t, const c10::optional<torch::Tensor>& s13,
                          const c10::optional<torch::Tensor>& o13, const torch::Tensor& w2t,
                          const c10::optional<torch::Tensor>& s2, const c10::optional<torch::Tensor>& o2,
                          int64_t group_size) {
  check_cpu_float(x, "x", 2);
  check_cpu_float(router, "router", 2);
  const int64_t t = x.size(0), d = x.size(1), e = router.size(0);
  TORCH_CHECK(router.size(1) == d, "router is ", router.sizes(), " for hidden size ", d);
  TORCH_CHECK(top_k >= 1 && top_k <= e, "top_k ", top_k, " out of range for ", e, " experts");
  TORCH_CHECK(w2t.dim() == 3, "w2t must be [E, I, D]");
  const int64_t inter = w2t.size(1);
  const StackedWeight w13("w13t", w13t, s13, o13, group_size, e, d, 2 * inter);
  const StackedWeight w2("w2t", w2t, s2, o2, group_size, e, inter, d);
  TORCH_CHECK(w13.format == w2.format, "w13t and w2t must share a format");

  const float* xp = x.data_ptr<float>();
  std::vector<int64_t> experts(t * top_k);
  std::vector<float> weights(t * top_k), logits(e);
  for (int64_t i = 0; i < t; ++i) {
    route(xp + i * d, router.data_ptr<float>(), e, d, top_k, norm_topk_prob, experts.data() + i * top_k,
          weights.data() + i * top_k, logits.data());
  }
  // pairs grouped by expert: slots start[e]..start[e+1] are expert e's; tokens[] and pair_of[] per slot
  std::vector<int64_t> start(e + 1, 0), tokens(t * top_k), pair_of(t * top_k);
  for (int64_t p = 0; p < t * top_k; ++p) ++start[experts[p] + 1];
  for (int64_t i = 0; i < e; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < t * top_k; ++p) {
    const int64_t slot = fill[experts[p]]++;
    tokens[slot] = p / top_k;
    pair_of[slot] = p;
  }
  std::vector<float> contrib(t * top_k * d);  // per routing pair [T A, D]
  at::parallel_for(0, e, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> hidden;
    std::vector<const float*> rows;
    std::vector<float*> outs;
    for (int64_t ex = begin; ex < end; ++ex) {
      const int64_t n = start[ex + 1] - start[ex];
      if (n == 0) continue;
      hidden.resize(n * 2 * inter);
      rows.resize(n);
      outs.resize(n);
      for (int64_t j = 0; j < n; ++j) {
        rows[j] = xp + tokens[start[ex] + j] * d;
        outs[j] = contrib.data() + pair_of[start[ex] + j] * d;
      }
      expert_ffn(rows.data(), n, d, inter, w13.expert(ex), w2.expert(ex), hidden.data(), outs.data());
    }
  });
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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm", &rms_norm, "RMSNorm over the last axis (float32)");
  m.def("decode_attention", &decode_attention, "decode attention over the decode workspace");
  m.def("moe_experts", &moe_experts, "gate + routed experts + combine, weight-stationary");
}
