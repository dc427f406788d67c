// Quantized matrix-vector products for CPU decoding: 4-bit and 8-bit weights times activations
// quantized to int8 in blocks of 32 (the Q4_1 x Q8 and Q8 x Q8 dot products of llama.cpp's CPU
// backend, written here for PyTorch tensors). Built at first use by evolm/kernels/__init__.py
// with -march=native; the AVX512-VNNI, AVX2 and plain C++ paths compute the same integer sums.
//
// Layouts (K = inputs, N = outputs, G = K / 32 groups):
//   q4 weights (N, K/2) uint8: group g of row n is 16 bytes, byte j = q[32g + j] | q[32g + j + 16] << 4,
//     q in 0..15, w = q * d[n, g] + m[n, g] with dm (N, G, 2) float16 holding (d, m) side by side:
//     20 bytes per 32 weights, as llama.cpp's Q4_1 (decoding streams the weights: bytes are time).
//   q8 weights (N, K) int8, w = q * s[n] with s (N,) float32.
//   activations: per row and group, dx = max|x| / 127, qx = round(x / dx) in int8.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t QK = 32;  // block length of weights and activations

// x (M, K) float -> qx (M, K) int8, dx (M, G) and dxs = dx * sum(qx) (M, G)
void quantize_rows(const float* x, int64_t M, int64_t K, int8_t* qx, float* dx, float* dxs) {
  const int64_t G = K / QK;
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t g = 0; g < G; ++g) {
      const float* v = x + r * K + g * QK;
      float amax = 0.f;
#pragma omp simd reduction(max : amax)
      for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(v[i]));
      const float d = amax / 127.f;
      const float inv = d > 0.f ? 1.f / d : 0.f;
      int sum = 0;
      int8_t* q = qx + r * K + g * QK;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < QK; ++i) {
        const float t = std::nearbyint(v[i] * inv);
        const int c = static_cast<int>(std::max(-127.f, std::min(127.f, t)));
        q[i] = static_cast<int8_t>(c);
        sum += c;
      }
      dx[r * G + g] = d;
      dxs[r * G + g] = d * static_cast<float>(sum);
    }
  }
}

#if defined(__AVX2__)
using evolm_simd::hsum;

// 8 int32 partial sums of u8 a times s8 b over 32 bytes
inline __m256i dot_u8s8(__m256i a, __m256i b) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), a, b);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(a, b), _mm256_set1_epi16(1));
#endif
}

// per (row, group): 8 lanes that sum to dx * sum(qx), so the Q4_1 minimum term is one more FMA
void lane_sums(const int8_t* qx, const float* dx, int64_t M, int64_t K, float* sxs) {
  const int64_t G = K / QK;
  const __m256i ones = _mm256_set1_epi8(1);
  for (int64_t r = 0; r < M; ++r)
    for (int64_t g = 0; g < G; ++g) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + g * QK));
      const __m256 s = _mm256_cvtepi32_ps(dot_u8s8(ones, a));
      _mm256_storeu_ps(sxs + (r * G + g) * 8, _mm256_mul_ps(s, _mm256_set1_ps(dx[r * G + g])));
    }
}

// (d, m) of one group, two float16 side by side, as two broadcast float32 vectors
inline void load_dm(const at::Half* dm, __m256& vd, __m256& vm) {
  int32_t bits;
  std::memcpy(&bits, dm, 4);
  const __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(bits));
  vd = _mm256_broadcastss_ps(f);
  vm = _mm256_broadcastss_ps(_mm_movehdup_ps(f));
}

// NR weight rows x MR activation rows: NR * MR independent accumulators (no FMA latency chain)
template <int NR, int MR>
inline void q4_tile(const uint8_t* w, const at::Half* dm, const int8_t* qx, const float* dx,
                    const float* sxs, int64_t K, float* out, int64_t N) {
  const int64_t G = K / QK;
  __m256 acc[NR][MR];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < MR; ++r) acc[j][r] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    __m256i a[MR];
    __m256 vdx[MR], vsx[MR];
    for (int r = 0; r < MR; ++r) {
      a[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + g * QK));
      vdx[r] = _mm256_set1_ps(dx[r * G + g]);
      vsx[r] = _mm256_loadu_ps(sxs + (r * G + g) * 8);
    }
    for (int j = 0; j < NR; ++j) {
      if ((g & 3) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + j) * (K / 2) + g * 16), _MM_HINT_T0);
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j * (K / 2) + g * 16));
      const __m256i wv = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), low4);
      __m256 vd, vm;
      load_dm(dm + (j * G + g) * 2, vd, vm);
      for (int r = 0; r < MR; ++r) {
        const __m256 s = _mm256_cvtepi32_ps(dot_u8s8(wv, a[r]));
        acc[j][r] = _mm256_fmadd_ps(s, _mm256_mul_ps(vd, vdx[r]), acc[j][r]);
        acc[j][r] = _mm256_fmadd_ps(vm, vsx[r], acc[j][r]);
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < MR; ++r) out[r * N + j] = hsum(acc[j][r]);
}

template <int NR, int MR>
inline void q8_tile(const int8_t* w, const float* sc, const int8_t* qx, const float* dx, int64_t K, float* out,
                    int64_t N) {
  const int64_t G = K / QK;
  __m256 acc[NR][MR];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < MR; ++r) acc[j][r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i a[MR];
    __m256 vdx[MR];
    for (int r = 0; r < MR; ++r) {
      a[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + r * K + g * QK));
      vdx[r] = _mm256_set1_ps(dx[r * G + g]);
    }
    for (int j = 0; j < NR; ++j) {
      // the next tile's rows, one cache line ahead of use (large matrices stream from memory)
      if ((g & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + j) * K + g * QK), _MM_HINT_T0);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + j * K + g * QK));
      const __m256i aw = _mm256_sign_epi8(wv, wv);  // |w| as u8; the sign moves to the activation
      for (int r = 0; r < MR; ++r) {
        const __m256 s = _mm256_cvtepi32_ps(dot_u8s8(aw, _mm256_sign_epi8(a[r], wv)));
        acc[j][r] = _mm256_fmadd_ps(s, vdx[r], acc[j][r]);
      }
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < MR; ++r) out[r * N + j] = hsum(acc[j][r]) * sc[j];
}

// int8 weights, one activation row: each weight row read front to back (a single stream for the
// hardware prefetcher; measured faster than the 4-row tile on SmolLM2's 28 MB head), four
// accumulators along K so that no FMA waits on the previous one
inline float q8_row1(const int8_t* w, const int8_t* qx, const float* dx, int64_t G) {
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    _mm_prefetch(reinterpret_cast<const char*>(w + (g + 16) * QK), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(w + (g + 18) * QK), _MM_HINT_T0);
    for (int u = 0; u < 4; ++u) {
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + (g + u) * QK));
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + (g + u) * QK));
      const __m256 s = _mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(a, wv)));
      acc[u] = _mm256_fmadd_ps(s, _mm256_set1_ps(dx[g + u]), acc[u]);
    }
  }
  for (; g < G; ++g) {
    const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + g * QK));
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + g * QK));
    const __m256 s = _mm256_cvtepi32_ps(dot_u8s8(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(a, wv)));
    acc[0] = _mm256_fmadd_ps(s, _mm256_set1_ps(dx[g]), acc[0]);
  }
  return hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
}

#endif

// rows n0..n1 of the output for all M activation rows
void q4_rows(const int8_t* qx, const float* dx, const float* dxs, const float* sxs, int64_t M, int64_t K,
             const uint8_t* qw, const at::Half* dm, float* out, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / QK;
#if defined(__AVX2__)
  (void)dxs;
  int64_t n = n0;
  auto rows = [&](auto nr, int64_t n) {
    constexpr int NR = decltype(nr)::value;
    const uint8_t* w = qw + n * (K / 2);
    int64_t r = 0;
    for (; r + 2 <= M; r += 2)
      q4_tile<NR, 2>(w, dm + n * G * 2, qx + r * K, dx + r * G, sxs + r * G * 8, K, out + r * N + n, N);
    if (r < M) q4_tile<NR, 1>(w, dm + n * G * 2, qx + r * K, dx + r * G, sxs + r * G * 8, K, out + r * N + n, N);
  };
  for (; n + 4 <= n1; n += 4) rows(std::integral_constant<int, 4>{}, n);
  for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
#else
  (void)sxs;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wrow = qw + n * (K / 2);
    for (int64_t row = 0; row < M; ++row) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int s = 0;
        for (int j = 0; j < 16; ++j) {
          const uint8_t byte = wrow[g * 16 + j];
          s += (byte & 0x0F) * qx[row * K + g * QK + j] + (byte >> 4) * qx[row * K + g * QK + j + 16];
        }
        const float d = static_cast<float>(dm[(n * G + g) * 2]), m = static_cast<float>(dm[(n * G + g) * 2 + 1]);
        acc += d * dx[row * G + g] * static_cast<float>(s) + m * dxs[row * G + g];
      }
      out[row * N + n] = acc;
    }
  }
#endif
}

void q8_rows(const int8_t* qx, const float* dx, int64_t M, int64_t K, const int8_t* qw, const float* sc,
             float* out, int64_t N, int64_t n0, int64_t n1) {
  const int64_t G = K / QK;
#if defined(__AVX2__)
  if (M == 1) {
    for (int64_t n = n0; n < n1; ++n) out[n] = q8_row1(qw + n * K, qx, dx, G) * sc[n];
    return;
  }
  int64_t n = n0;
  auto rows = [&](auto nr, int64_t n) {
    constexpr int NR = decltype(nr)::value;
    int64_t r = 0;
    for (; r + 2 <= M; r += 2) q8_tile<NR, 2>(qw + n * K, sc + n, qx + r * K, dx + r * G, K, out + r * N + n, N);
    if (r < M) q8_tile<NR, 1>(qw + n * K, sc + n, qx + r * K, dx + r * G, K, out + r * N + n, N);
  };
  for (; n + 4 <= n1; n += 4) rows(std::integral_constant<int, 4>{}, n);
  for (; n < n1; ++n) rows(std::integral_constant<int, 1>{}, n);
#else
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wrow = qw + n * K;
    for (int64_t row = 0; row < M; ++row) {
      float acc = 0.f;
      for (int64_t g = 0; g < G; ++g) {
        int s = 0;
        for (int j = 0; j < QK; ++j) s += wrow[g * QK + j] * qx[row * K + g * QK + j];
        acc += dx[row * G + g] * static_cast<float>(s);
      }
      out[row * N + n] = acc * sc[n];
    }
  }
#endif
}

// the quantized activations of one call, in a per-thread scratch buffer reused across calls (a
// decode step makes 120+ of these calls: five allocations each were ~5% of the step, profiled)
struct QuantAct {
  at::Tensor xf;
  const int8_t* qx;
  const float *dx, *dxs, *sxs;
};

QuantAct quantize_input(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "evolm qgemv: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(K % QK == 0, "evolm qgemv: in_features must be a multiple of 32, got ", K);
  QuantAct q;
  q.xf = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), G = K / QK;
  thread_local std::vector<float> scratch;  // dx, dxs, sxs (8 lanes per group), then the int8 codes
  const size_t floats = static_cast<size_t>(M * G * 10), bytes = floats * 4 + static_cast<size_t>(M * K);
  if (scratch.size() * 4 < bytes) scratch.resize((bytes + 3) / 4);
  float* f = scratch.data();
  int8_t* qx = reinterpret_cast<int8_t*>(f + floats);
  quantize_rows(q.xf.data_ptr<float>(), M, K, qx, f, f + M * G);
#if defined(__AVX2__)
  lane_sums(qx, f, M, K, f + 2 * M * G);
#endif
  q.qx = qx, q.dx = f, q.dxs = f + M * G, q.sxs = f + 2 * M * G;
  return q;
}

// rows [0, N) in chunks handed to the threads as they finish (llama.cpp schedules its matmuls the
// same way): a static half per thread waits for the slower core, and on a shared host one of the
// two often is
template <class F>
void dynamic_rows(int64_t N, const F& rows) {
  const int64_t threads = at::get_num_threads();
  const int64_t chunk = std::max<int64_t>(16, (N / (8 * threads)) & ~int64_t(3));  // whole 4-row tiles
  const int64_t chunks = (N + chunk - 1) / chunk;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min(threads, chunks), 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) rows(c * chunk, std::min(N, (c + 1) * chunk));
  });
}

// q4 codes (N, K/2) uint8 and their (N, K/32, 2) float16 (d, m) pairs; returns K
int64_t check_q4(const at::Tensor& qw, const at::Tensor& dm, const char* op) {
  const int64_t N = qw.size(0), K = qw.size(1) * 2;
  TORCH_CHECK(qw.scalar_type() == at::kByte && qw.is_contiguous(), "evolm ", op, ": qw must be contiguous uint8");
  TORCH_CHECK(dm.scalar_type() == at::kHalf && dm.is_contiguous() && dm.dim() == 3 && dm.size(0) == N &&
              dm.size(1) == K / QK && dm.size(2) == 2,
              "evolm ", op, ": dm must be contiguous float16 (N, K/32, 2), got ", dm.scalar_type(), " ", dm.sizes());
  return K;
}

}  // namespace

at::Tensor q4a8_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& dm) {
  const int64_t N = qw.size(0), K = check_q4(qw, dm, "q4a8_linear");
  QuantAct q = quantize_input(x, K);
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const uint8_t* w = qw.data_ptr<uint8_t>();
  const at::Half* dmp = dm.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  dynamic_rows(N, [&](int64_t n0, int64_t n1) { q4_rows(q.qx, q.dx, q.dxs, q.sxs, M, K, w, dmp, o, N, n0, n1); });
  return out;
}

at::Tensor q8a8_linear(const at::Tensor& x, const at::Tensor& qw, const at::Tensor& s) {
  const int64_t N = qw.size(0), K = qw.size(1);
  TORCH_CHECK(qw.scalar_type() == at::kChar && qw.is_contiguous(), "evolm q8a8_linear: qw must be contiguous int8");
  TORCH_CHECK(s.scalar_type() == at::kFloat && s.numel() == N && s.is_contiguous(),
              "evolm q8a8_linear: s must be contiguous float32 (N,)");
  QuantAct q = quantize_input(x, K);
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  const int8_t* w = qw.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* o = out.data_ptr<float>();
  dynamic_rows(N, [&](int64_t n0, int64_t n1) { q8_rows(q.qx, q.dx, M, K, w, sp, o, N, n0, n1); });
  return out;
}

// q4 weights back to float (N, K): prefill multiplies many rows, so the layer dequantizes once
// per forward; one pass over the codes instead of PyTorch's unpack, stack, multiply and add
at::Tensor q4_dequantize(const at::Tensor& qw, const at::Tensor& dm) {
  const int64_t N = qw.size(0), K = check_q4(qw, dm, "q4_dequantize"), G = K / QK;
  at::Tensor out = at::empty({N, K}, qw.options().dtype(at::kFloat));
  const uint8_t* w = qw.data_ptr<uint8_t>();
  const at::Half* p = dm.data_ptr<at::Half>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N * G, 256, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float d = static_cast<float>(p[2 * b]), m = static_cast<float>(p[2 * b + 1]);
      const uint8_t* src = w + b * 16;
      float* dst = o + b * QK;
#pragma omp simd
      for (int j = 0; j < 16; ++j) {
        dst[j] = static_cast<float>(src[j] & 0x0F) * d + m;
        dst[j + 16] = static_cast<float>(src[j] >> 4) * d + m;
      }
    }
  });
  return out;
}

std::string isa() {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return "avx512vnni";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "scalar";
#endif
}

TORCH_LIBRARY(evolm_q, lib) {
  lib.def("q4a8_linear(Tensor x, Tensor qw, Tensor dm) -> Tensor");
  lib.def("q8a8_linear(Tensor x, Tensor qw, Tensor s) -> Tensor");
  lib.def("q4_dequantize(Tensor qw, Tensor dm) -> Tensor");
}

TORCH_LIBRARY_IMPL(evolm_q, CPU, lib) {
  lib.impl("q4a8_linear", &q4a8_linear);
  lib.impl("q8a8_linear", &q8a8_linear);
  lib.impl("q4_dequantize", &q4_dequantize);
}

std::string skinny_isa();                          // skinny_gemm.cpp
void register_block_plan(pybind11::module& mod);  // decode_block.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("isa", &isa);
  mod.def("skinny_isa", &skinny_isa);
  register_block_plan(mod);
}
