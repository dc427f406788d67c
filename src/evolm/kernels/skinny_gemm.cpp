// Float "skinny" matrix products for CPU decoding: y (M, N) = x (M, K) @ w (N, K)^T for a few
// activation rows (M <= 16) and fp32, bf16 or int8 (per-row scale) weights, reading every weight
// exactly once.
//
// Decoding one token per sequence multiplies a handful of activation rows by every weight matrix:
// the work is bound by how fast the weights stream from memory, not by arithmetic. The BLAS
// kernels F.linear reaches are built for large M; at M = 1..8 they stream fp32 weights at about a
// third of the machine's read bandwidth (measured: 9.6 GB/s of 30 on 2 Zen 4 cores). Here a tile
// of NR weight rows (8 for one activation row, 4 for up to 4, else 2) is loaded once per K-step and
// multiplied into R activation rows held in registers (the next R rows find the tile in L1), with
// fp32 accumulation; the next tile is prefetched while this one computes.
// bf16 weights are widened to fp32 by a shift and int8 ones by a convert (both exact), so their
// products equal fp32 ones of the same values.
// Built together with qgemv.cpp by evolm/kernels/__init__.py (-march=native): AVX-512, AVX2 and
// plain C++ paths.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd.h"

namespace {

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

template <class W>
inline float to_float(W v) {
  if constexpr (std::is_same_v<W, uint16_t>) return bf16_to_float(v);
  else return static_cast<float>(v);
}

// one SIMD width (evolm/kernels/simd.h) and how many activation rows a pass takes with 4 / 2
// weight rows per tile (registers: 32 zmm / 16 ymm)
#if defined(__AVX512F__)
struct Vec : evolm_simd::V16 { static constexpr int R4 = 4, R2 = 8; };
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec : evolm_simd::V8 { static constexpr int R4 = 2, R2 = 4; };
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// NR weight rows (row stride K) x R activation rows (row stride K) -> out[r * ldo + j]: each weight
// vector is loaded once and multiplied into all R rows, whose K-slice sits in registers
template <int NR, int R, class W, class O>
inline void tile(const W* w, const float* x, int64_t K, O* out, int64_t ldo) {
  typename Vec::Reg acc[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = Vec::zero();
  const int64_t Kv = K - K % Vec::L;
  for (int64_t k = 0; k < Kv; k += Vec::L) {
    typename Vec::Reg xv[R];
    for (int r = 0; r < R; ++r) xv[r] = Vec::load(x + r * K + k);
    for (int j = 0; j < NR; ++j) {
      // the next tile's rows at this column: they stream from memory while this tile computes
      // (one weight row at a time reads memory in order: the hardware prefetcher does better)
      if constexpr (NR > 1) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + j) * K + k), _MM_HINT_T0);
      const typename Vec::Reg wv = Vec::load(w + j * K + k);
      for (int r = 0; r < R; ++r) acc[j][r] = Vec::fma(wv, xv[r], acc[j][r]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) {
      float s = Vec::sum(acc[j][r]);
      for (int64_t k = Kv; k < K; ++k) s += to_float(w[j * K + k]) * x[r * K + k];
      out[r * ldo + j] = static_cast<O>(s);
    }
}

#if defined(__AVX512BF16__)
// bf16 weights times bf16 activations (AVX512-BF16): one vdpbf16ps multiplies 32 bf16 pairs and
// adds each two neighbouring products into one of 16 fp32 lanes, so a whole cache line of weights
// costs one load and one instruction, with no widening. The one-row bf16 product with widening
// loads ran at ~16 GB/s here, compute-bound, against ~23 for fp32 weights (benchmarks/gemv.py).
// Each bf16 x bf16 product is exact in fp32; the instruction treats subnormal inputs as zero and
// rounds to nearest even, so results equal fp32 accumulation up to the order of the sum.
template <int NR, int R, class O>
inline void tile(const uint16_t* w, const uint16_t* x, int64_t K, O* out, int64_t ldo) {
  __m512 acc[NR][R];
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  const int64_t Kv = K - K % 32;
  for (int64_t k = 0; k < Kv; k += 32) {
    __m512bh xv[R];
    for (int r = 0; r < R; ++r) xv[r] = (__m512bh)_mm512_loadu_si512(x + r * K + k);
    for (int j = 0; j < NR; ++j) {
      if constexpr (NR > 1) _mm_prefetch(reinterpret_cast<const char*>(w + (NR + j) * K + k), _MM_HINT_T0);
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + j * K + k);
      for (int r = 0; r < R; ++r) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv, xv[r]);
    }
  }
  for (int j = 0; j < NR; ++j)
    for (int r = 0; r < R; ++r) {
      float s = _mm512_reduce_add_ps(acc[j][r]);
      for (int64_t k = Kv; k < K; ++k) s += bf16_to_float(w[j * K + k]) * bf16_to_float(x[r * K + k]);
      out[r * ldo + j] = static_cast<O>(s);
    }
}
#endif

// one pass of R = 1..RMAX activation rows (R known at run time) over NR weight rows
template <int NR, int RMAX, class W, class X, class O>
inline void tile_r(int64_t R, const W* w, const X* x, int64_t K, O* out, int64_t ldo) {
  switch (R) {
    case 1: return tile<NR, 1>(w, x, K, out, ldo);
    case 2: return tile<NR, 2>(w, x, K, out, ldo);
    case 3: return tile<NR, (RMAX >= 3 ? 3 : 1)>(w, x, K, out, ldo);
    case 4: return tile<NR, (RMAX >= 4 ? 4 : 1)>(w, x, K, out, ldo);
    case 5: return tile<NR, (RMAX >= 5 ? 5 : 1)>(w, x, K, out, ldo);
    case 6: return tile<NR, (RMAX >= 6 ? 6 : 1)>(w, x, K, out, ldo);
    case 7: return tile<NR, (RMAX >= 7 ? 7 : 1)>(w, x, K, out, ldo);
    default: return tile<NR, (RMAX >= 8 ? 8 : 1)>(w, x, K, out, ldo);
  }
}

// all M rows, NR weight rows at a time, in passes of at most RMAX activation rows
template <int NR, int RMAX, class W, class X, class O>
void rows_nr(const W* w, const X* x, int64_t M, int64_t K, O* out, int64_t N, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR)
    for (int64_t r = 0; r < M; r += RMAX)
      tile_r<NR, RMAX>(std::min<int64_t>(RMAX, M - r), w + n * K, x + r * K, K, out + r * N + n, N);
  for (; n < n1; ++n)  // the last weight rows of this task, one at a time
    for (int64_t r = 0; r < M; r += RMAX)
      tile_r<1, RMAX>(std::min<int64_t>(RMAX, M - r), w + n * K, x + r * K, K, out + r * N + n, N);
}
#endif

// output columns n0..n1 for all M rows (x: fp32 rows, or bf16 ones with bf16 weights on AVX512-BF16)
template <class W, class X, class O>
void rows(const W* w, const X* x, int64_t M, int64_t K, O* out, int64_t N, int64_t n0, int64_t n1) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  // registers: NR * R accumulators + NR weight vectors (32 zmm / 16 ymm). A few activation rows
  // (up to 2, or 4 with bf16 pairs, which do twice the work per instruction) read one weight row
  // after the other, i.e. memory in order, which the hardware prefetcher streams at the full
  // read rate: tiles of 8 interleaved rows of SmolLM2's 576 columns reached ~70% of it (Zen 4,
  // 2 threads, one row, bf16: 18 vs 24-38 GB/s, fp32: 27 vs 26-41, on a shared host). More rows
  // are compute-bound and share each loaded weight vector among them.
  constexpr int in_order = std::is_same_v<X, uint16_t> ? 4 : 2;
  if (M <= in_order) rows_nr<1, 4>(w, x, M, K, out, N, n0, n1);
  else if (M <= Vec::R4) rows_nr<4, Vec::R4>(w, x, M, K, out, N, n0, n1);
  else rows_nr<2, Vec::R2>(w, x, M, K, out, N, n0, n1);
#else
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < M; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += to_float(w[n * K + k]) * to_float(x[r * K + k]);
      out[r * N + n] = static_cast<O>(s);
    }
#endif
}

}  // namespace

// x (M, K) fp32 or bf16, w (N, K) fp32, bf16 or int8 -> (M, N) in x's dtype, fp32 accumulation;
// int8 weights take one scale per output row (y = (x . q) * scale, weight-only int8)
at::Tensor skinny_linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1),
              "evolm skinny_linear: x must be (M, K) and w (N, K), got ", x.sizes(), " and ", w.sizes());
  const auto wt = w.scalar_type();
  TORCH_CHECK(wt == at::kFloat || wt == at::kBFloat16 || wt == at::kChar,
              "evolm skinny_linear: weights must be float32, bfloat16 or int8, got ", wt);
  TORCH_CHECK(w.is_contiguous(), "evolm skinny_linear: weights must be contiguous");
  TORCH_CHECK((wt == at::kChar) == scale.has_value(),
              "evolm skinny_linear: int8 weights need a float32 scale per row (and only they take one)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  at::Tensor sc;
  if (scale.has_value()) {
    sc = scale->to(at::kFloat).contiguous();
    TORCH_CHECK(sc.dim() == 1 && sc.size(0) == N, "evolm skinny_linear: scale must be (N,) = (", N,
                ",), got ", scale->sizes());
  }
  // bf16 activations (fp32 or bf16 weights) get their result in bf16 straight from the kernel (one
  // rounding, as .to(bf16) would do, without a second pass and tensor)
  const bool bf16_out = x.scalar_type() == at::kBFloat16 && wt != at::kChar;
  at::Tensor out = at::empty({M, N}, x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  // a multiple of the 8-row tile, a few tasks per thread
  const int64_t grain = std::max<int64_t>(16, (N / (4 * at::get_num_threads())) & ~int64_t(7));
  const auto product = [&](const auto* wp, const auto* xp) {
    if (bf16_out) {
      at::BFloat16* o = out.data_ptr<at::BFloat16>();
      at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) { rows(wp, xp, M, K, o, N, a, b); });
    } else {
      float* o = out.data_ptr<float>();
      at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) { rows(wp, xp, M, K, o, N, a, b); });
    }
  };
#if defined(__AVX512BF16__)
  if (wt == at::kBFloat16 && x.scalar_type() == at::kBFloat16) {  // bf16 pairs, no widening
    const at::Tensor xc = x.contiguous();
    product(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()),
            reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()));
    return out;
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const float* xp = xf.data_ptr<float>();
  if (wt == at::kFloat) {
    product(w.data_ptr<float>(), xp);
  } else if (wt == at::kBFloat16) {
    product(reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), xp);
  } else {
    const int8_t* wp = w.data_ptr<int8_t>();
    const float* sp = sc.data_ptr<float>();
    float* o = out.data_ptr<float>();
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
      rows(wp, xp, M, K, o, N, a, b);
      for (int64_t r = 0; r < M; ++r)
        for (int64_t n = a; n < b; ++n) o[r * N + n] *= sp[n];
    });
  }
  return out.scalar_type() == x.scalar_type() ? out : out.to(x.scalar_type());
}

std::string skinny_isa() {
#if defined(__AVX512BF16__)
  return "avx512bf16";
#elif defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

TORCH_LIBRARY(evolm_f, lib) { lib.def("skinny_linear(Tensor x, Tensor w, Tensor? scale=None) -> Tensor"); }

TORCH_LIBRARY_IMPL(evolm_f, CPU, lib) { lib.impl("skinny_linear", &skinny_linear); }
