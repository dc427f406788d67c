// Attention of one new token per sequence over a KV cache, for CPU decoding.
//
// out[b, h] = softmax(mask(cap(scale * q[b, h] . k[b, h / G, j]))) @ v[b, h / G, j], G = H / Hkv
// query heads sharing a KV head (GQA), scores and sums in fp32, cap the optional soft-cap
// (cap * tanh(s / cap), Gemma 2).
//
// Why a kernel: inductor writes this as three reductions over every cache slot (q.k per slot, the
// softmax's max and sum, then p.v with one division per slot and value chunk), with a barrier and
// an `omp single` cache write between them: ~72 us per SmolLM2 layer on two AVX2 cores, 30 layers
// a token (profiled; ~15% of an int4 decode step). Here the query heads that share a KV head are
// computed together (each key and value row is read once for all of them: decoding's KV cache
// streams from memory, as the weights do), the slots a mask hides are skipped (a static cache's
// unfilled tail and a sliding window's old slots cost nothing), exponentials are vectorized, and
// when there are fewer (sequence, KV head) pairs than threads the keys are split between tasks
// whose partial softmaxes are merged at the end (flash-decoding: Dao et al. 2023). On AVX-512 the
// key dot products and the value sums run 16 lanes wide, the values in one pass of 64 outputs
// (2,000-token SmolLM2 context, 2 threads: 103 -> 69 us per bf16 layer, 164 -> 108 fp32).
//
// Layouts: q (B, H, 1, D); k, v (B, Hkv, S, D) and (B, Hkv, S, Dv), last dimension contiguous, any
// other strides (a static cache's buffers); mask (B or 1, 1, 1, S) bool, True = may attend;
// q, k, v float32 or bfloat16 (all one dtype). Returns (B, H, 1, Dv) in v's dtype. A row that may
// attend nothing gives zeros (PyTorch's softmax would give NaN; the models never build one).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

constexpr int GMAX = 4;  // query heads per block (GQA groups larger than this take several blocks)

inline float widen(float v) { return v; }
inline float widen(at::BFloat16 v) { return static_cast<float>(v); }

#if defined(__AVX2__) && defined(__FMA__)
using evolm_simd::V8;
using evolm_simd::hsum;
// e^x for x <= 0 (scores minus their maximum): x = n ln2 + r, e^r by Cephes' expf polynomial
// (relative error ~1e-7), 2^n from the exponent bits; below -87 the result is ~1e-38, not 0
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
#endif

#if defined(__AVX512F__)
using evolm_simd::V16;
#endif
#if defined(__AVX2__) && defined(__FMA__)
// scores s[g * n + i] = q_g . k[live[i]] for keys i0..n of GB heads (D a multiple of V::L): each key
// row is read once for all GB heads; returns n
template <class V, int GB, class T>
int64_t scores(const float* q, const T* k, int64_t ks, const int32_t* live, int64_t i0, int64_t n, int64_t D,
               float* s) {
  for (int64_t i = i0; i < n; ++i) {
    const T* kr = k + live[i] * ks;
    typename V::Reg a[GB];
    for (int g = 0; g < GB; ++g) a[g] = V::zero();
    for (int64_t d = 0; d < D; d += V::L) {
      const typename V::Reg kv = V::load(kr + d);
      for (int g = 0; g < GB; ++g) a[g] = V::fma(V::load(q + g * D + d), kv, a[g]);
    }
    for (int g = 0; g < GB; ++g) s[g * n + i] = V::sum(a[g]);
  }
  return n;
}
#endif

// One block of GB query heads (fp32, already scaled, GB x D) against the keys live[0..n) of their
// KV head: the unnormalized softmax numerators' product with the values (acc, GB x Dv), their
// maximum score m and sum l per head. s is scratch for GB x n scores.
template <int GB, class T>
void block(const float* q, const T* k, const T* v, int64_t ks, int64_t vs, const int32_t* live, int64_t n,
           int64_t D, int64_t Dv, float cap, float* s, float* m, float* l, float* acc) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if (D % 16 == 0) i = scores<V16, GB>(q, k, ks, live, i, n, D, s);
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if (D % 8 == 0) i = scores<V8, GB>(q, k, ks, live, i, n, D, s);
#endif
  for (; i < n; ++i) {
    const T* kr = k + live[i] * ks;
    for (int g = 0; g < GB; ++g) {
      float a = 0.f;
      for (int64_t d = 0; d < D; ++d) a += q[g * D + d] * widen(kr[d]);
      s[g * n + i] = a;
    }
  }
  for (int g = 0; g < GB; ++g) {
    float* sg = s + g * n;
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t j = 0; j < n; ++j) {
      if (cap > 0.f) sg[j] = cap * std::tanh(sg[j] / cap);
      mx = std::max(mx, sg[j]);
    }
    float sum = 0.f;
    int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 vs8 = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(sg + j), _mm256_set1_ps(mx)));
      _mm256_storeu_ps(sg + j, e);
      vs8 = _mm256_add_ps(vs8, e);
    }
    sum = hsum(vs8);
#endif
    for (; j < n; ++j) {
      sg[j] = std::exp(sg[j] - mx);
      sum += sg[j];
    }
    m[g] = mx;
    l[g] = sum;
  }
  int64_t d0 = 0;
#if defined(__AVX512F__)
  // 64 outputs of GB heads in registers (4 x GB accumulators): one pass over the values where the
  // AVX2 loop below makes four, each reading a quarter of every value row
  for (; d0 + 64 <= Dv; d0 += 64) {
    __m512 a[GB][4];
    for (int g = 0; g < GB; ++g)
      for (int u = 0; u < 4; ++u) a[g][u] = _mm512_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const T* vr = v + live[j] * vs + d0;
      const __m512 v0 = V16::load(vr), v1 = V16::load(vr + 16), v2 = V16::load(vr + 32), v3 = V16::load(vr + 48);
      for (int g = 0; g < GB; ++g) {
        const __m512 p = _mm512_set1_ps(s[g * n + j]);
        a[g][0] = _mm512_fmadd_ps(p, v0, a[g][0]);
        a[g][1] = _mm512_fmadd_ps(p, v1, a[g][1]);
        a[g][2] = _mm512_fmadd_ps(p, v2, a[g][2]);
        a[g][3] = _mm512_fmadd_ps(p, v3, a[g][3]);
      }
    }
    for (int g = 0; g < GB; ++g)
      for (int u = 0; u < 4; ++u) _mm512_storeu_ps(acc + g * Dv + d0 + 16 * u, a[g][u]);
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  for (; d0 + 16 <= Dv; d0 += 16) {  // 16 outputs of GB heads in registers, one pass over the values
    __m256 a[GB][2];
    for (int g = 0; g < GB; ++g) a[g][0] = a[g][1] = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; ++j) {
      const T* vr = v + live[j] * vs + d0;
      const __m256 v0 = V8::load(vr), v1 = V8::load(vr + 8);
      for (int g = 0; g < GB; ++g) {
        const __m256 p = _mm256_set1_ps(s[g * n + j]);
        a[g][0] = _mm256_fmadd_ps(p, v0, a[g][0]);
        a[g][1] = _mm256_fmadd_ps(p, v1, a[g][1]);
      }
    }
    for (int g = 0; g < GB; ++g) {
      _mm256_storeu_ps(acc + g * Dv + d0, a[g][0]);
      _mm256_storeu_ps(acc + g * Dv + d0 + 8, a[g][1]);
    }
  }
#endif
  for (; d0 < Dv; ++d0)
    for (int g = 0; g < GB; ++g) {
      float a = 0.f;
      for (int64_t j = 0; j < n; ++j) a += s[g * n + j] * widen(v[live[j] * vs + d0]);
      acc[g * Dv + d0] = a;
    }
}

template <class T>
void block_any(int gb, const float* q, const T* k, const T* v, int64_t ks, int64_t vs, const int32_t* live,
               int64_t n, int64_t D, int64_t Dv, float cap, float* s, float* m, float* l, float* acc) {
  switch (gb) {
    case 1: return block<1>(q, k, v, ks, vs, live, n, D, Dv, cap, s, m, l, acc);
    case 2: return block<2>(q, k, v, ks, vs, live, n, D, Dv, cap, s, m, l, acc);
    case 3: return block<3>(q, k, v, ks, vs, live, n, D, Dv, cap, s, m, l, acc);
    default: return block<4>(q, k, v, ks, vs, live, n, D, Dv, cap, s, m, l, acc);
  }
}

template <class T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const bool* mp, int64_t mb, int64_t ms,
         float scale, float cap, at::Tensor& out, const int64_t* rows) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2), Dv = v.size(3);
  const int64_t G = H / Hkv, NB = (G + GMAX - 1) / GMAX;  // head blocks per KV head
  // the slots each sequence may attend (the mask is the same for all its heads)
  std::vector<std::vector<int32_t>> live(B);
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    live[b].reserve(S);
    for (int64_t j = 0; j < S; ++j)
      if (mp == nullptr || mp[b * mb + j * ms]) live[b].push_back(static_cast<int32_t>(j));
    longest = std::max<int64_t>(longest, live[b].size());
  }
  // split the keys when one sequence's (KV head, head block) tasks alone would leave threads idle.
  // Each sequence is split as it would be alone -- into min(per, its keys / 64) parts, whatever the
  // batch -- so its sums, and its output bit for bit, do not depend on the batch it decodes in (a
  // server's continuous batch); parts past a sequence's own count are empty and merge as nothing.
  const int64_t base = B * Hkv * NB, threads = at::get_num_threads();
  const int64_t per = (2 * threads + Hkv * NB - 1) / (Hkv * NB);
  const auto parts = [&](int64_t n) { return std::max<int64_t>(1, std::min<int64_t>(per, n / 64)); };
  const int64_t splits = parts(longest);
  std::vector<float> qf(B * H * D), m(base * splits * GMAX), l(base * splits * GMAX),
      acc(base * splits * GMAX * Dv);
  const T* qp = q.data_ptr<T>();
  for (int64_t i = 0; i < B * H * D; ++i) qf[i] = widen(qp[i]) * scale;
  const T *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
  at::parallel_for(0, base * splits, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> s;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t part = t % splits, blk = (t / splits) % NB, hk = (t / splits / NB) % Hkv, b = t / splits / NB / Hkv;
      const int64_t h0 = hk * G + blk * GMAX, gb = std::min<int64_t>(GMAX, G - blk * GMAX);
      const int64_t n = static_cast<int64_t>(live[b].size()), own = parts(n);
      const int64_t i0 = part < own ? n * part / own : n, i1 = part < own ? n * (part + 1) / own : n;
      s.resize(gb * std::max<int64_t>(1, i1 - i0));
      const int64_t r = rows ? rows[b] : b;  // the cache row of sequence b
      block_any<T>(static_cast<int>(gb), qf.data() + (b * H + h0) * D, kp + r * k.stride(0) + hk * k.stride(1),
                   vp + r * v.stride(0) + hk * v.stride(1), k.stride(2), v.stride(2), live[b].data() + i0, i1 - i0,
                   D, Dv, cap, s.data(), m.data() + t * GMAX, l.data() + t * GMAX, acc.data() + t * GMAX * Dv);
    }
  });
  // merge the splits: out = sum_p e^(m_p - M) acc_p / sum_p e^(m_p - M) l_p
  T* op = out.data_ptr<T>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t hk = h / G, blk = (h % G) / GMAX, g = (h % G) % GMAX;
      const int64_t t0 = ((b * Hkv + hk) * NB + blk) * splits;
      float M = -std::numeric_limits<float>::infinity();
      for (int64_t p = 0; p < splits; ++p) M = std::max(M, m[(t0 + p) * GMAX + g]);
      std::vector<float> w(splits);
      float L = 0.f;
      for (int64_t p = 0; p < splits; ++p) {
        const float mp_ = m[(t0 + p) * GMAX + g];
        w[p] = mp_ == -std::numeric_limits<float>::infinity() ? 0.f : std::exp(mp_ - M);
        L += w[p] * l[(t0 + p) * GMAX + g];
      }
      const float inv = L > 0.f ? 1.f / L : 0.f;
      T* o = op + (b * H + h) * Dv;
      for (int64_t d = 0; d < Dv; ++d) {
        float a = 0.f;
        for (int64_t p = 0; p < splits; ++p) a += w[p] * acc[((t0 + p) * GMAX + g) * Dv + d];
        o[d] = static_cast<T>(a * inv);
      }
    }
}

}  // namespace

// rows (B int64 values, or nullptr): sequence b attends over row rows[b] of k and v, which may hold more
// rows (a server's cache: decoded together, its sequences sit in rows that come and go) -- the rows
// are read in place, where gathering them first copied every layer's whole cache rows at every step
at::Tensor decode_attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, double scale, std::optional<double> softcap,
                                 const int64_t* rows) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1,
              "evolm decode_attention: q must be (B, H, 1, D) and k, v (B, Hkv, S, D), got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2), Dv = v.size(3);
  if (rows)
    for (int64_t b = 0; b < B; ++b)
      TORCH_CHECK(rows[b] >= 0 && rows[b] < k.size(0) && rows[b] < v.size(0), "evolm decode_attention: row ", rows[b],
                  " is not a row of the cache (", k.size(0), " rows)");
  TORCH_CHECK((rows || (k.size(0) == B && v.size(0) == B)) && v.size(1) == Hkv && v.size(2) == S && k.size(3) == D &&
                  Hkv > 0 && H % Hkv == 0,
              "evolm decode_attention: shapes do not match: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type() &&
                  (q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16),
              "evolm decode_attention: q, k, v must all be float32 or all bfloat16");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "evolm decode_attention: k and v need a contiguous last dim");
  const bool* mp = nullptr;
  int64_t mb = 0, ms = 0;
  at::Tensor m;
  if (mask.has_value()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 4 && (m.size(0) == B || m.size(0) == 1) &&
                    m.size(1) == 1 && m.size(2) == 1 && m.size(3) == S,
                "evolm decode_attention: mask must be bool (B or 1, 1, 1, ", S, "), got ", m.scalar_type(), " ",
                m.sizes());
    mp = m.data_ptr<bool>();
    mb = m.size(0) == 1 ? 0 : m.stride(0);
    ms = m.stride(3);
  }
  const at::Tensor qc = q.contiguous();
  at::Tensor out = at::empty({B, H, 1, Dv}, v.options());
  const float cap = softcap.has_value() ? static_cast<float>(*softcap) : 0.f;
  AT_DISPATCH_SWITCH(q.scalar_type(), "decode_attention",
    AT_DISPATCH_CASE(at::kFloat, [&] { run<scalar_t>(qc, k, v, mp, mb, ms, static_cast<float>(scale), cap, out, rows); })
    AT_DISPATCH_CASE(at::kBFloat16, [&] { run<scalar_t>(qc, k, v, mp, mb, ms, static_cast<float>(scale), cap, out, rows); }));
  return out;
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale, std::optional<double> softcap) {
  return decode_attention_rows(q, k, v, mask, scale, softcap, nullptr);
}

TORCH_LIBRARY_FRAGMENT(evolm_f, lib) {
  lib.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float? softcap=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(evolm_f, CPU, lib) { lib.impl("decode_attention", &decode_attention); }
