// Float products with a quantized file's weights, exactly: y (M, N) = x (M, K) @ W^T where W is held
// as the file's blocks (codes, and one scale and minimum per group of inputs) and every weight is
// rebuilt in registers as fma(code, scale, min), the same float32 value the file's dequantization
// gives (evolm/interop/gguf_blocks.py chooses codes, scales and minima so that it does, and the
// loader checks it). The arithmetic is fp32, as with the dequantized weights (with bf16 activations
// each weight is first rounded to bf16, as a bf16 model's is); only the bytes read differ: 6 bits
// per weight for 4-bit codes, 9-10 for 8-bit ones, against 32 (or 16).
//
// Why: decoding reads every weight once per token and is bound by memory bandwidth. A model loaded
// from a Q4_1 or Q4_K_M GGUF file and run in fp32 reads 5-6x more bytes than the file holds, for
// the same numbers. Unlike llama.cpp's dot products (which quantize the activations to int8,
// evolm/kernels/qgemv.cpp), nothing here is rounded that fp32 arithmetic on the dequantized
// weights would not round: results equal F.linear's up to the order of the fp32 sums.
//
// Layouts (K inputs, N outputs, G inputs per group, K % G == 0):
//   4-bit codes: (N, K/2) uint8, G = 32; group g of a row is 16 bytes, byte j holds code 32g + j
//     in its low nibble and code 32g + j + 16 in its high one (llama.cpp's Q4_0/Q4_1 order).
//   8-bit codes: (N, K) int8, G = 16 or 32.
//   scale, min: (N, K / G) float32; min may be absent (w = code * scale).
// Built with the other kernels by evolm/kernels/__init__.py (-march=native): AVX-512, AVX2 and
// plain C++ paths, all rebuilding each weight with one fused multiply-add.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

struct Blocks {
  const uint8_t* codes;  // row n starts at codes + n * row_bytes
  int64_t row_bytes;
  const float* scale;    // (N, ng)
  const float* min;      // (N, ng) or nullptr
  int64_t ng;            // groups per row
  bool bf16;             // round each rebuilt weight to bf16 (a bf16 model's weights), products in fp32
};

// weight k of row n, scalar: the reference every vector path equals
template <int BITS, int G>
inline float weight_at(const Blocks& b, int64_t n, int64_t k) {
  const int64_t g = k / G, j = k % G;
  const uint8_t* p = b.codes + n * b.row_bytes;
  float code;
  if constexpr (BITS == 4) {
    const uint8_t byte = p[g * 16 + (j % 16)];
    code = static_cast<float>(j < 16 ? (byte & 0x0F) : (byte >> 4));
  } else {
    code = static_cast<float>(reinterpret_cast<const int8_t*>(p)[k]);
  }
  const float s = b.scale[n * b.ng + g];
  const float w = b.min ? std::fma(code, s, b.min[n * b.ng + g]) : code * s;
  return b.bf16 ? static_cast<float>(c10::BFloat16(w)) : w;
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#if defined(__AVX512F__)
using Vec = evolm_simd::V16;
#else
using Vec = evolm_simd::V8;
#endif
using Reg = Vec::Reg;
constexpr int L = Vec::L;

// the G weights of group g of one row, in G / L registers: fma(code, scale, min) (or code * scale)
template <int BITS, int G, bool MIN>
inline void decode(const uint8_t* row, int64_t g, float s, float m, Reg* w) {
  const Reg vs = Vec::set1(s);
  Reg q[G / L];
  if constexpr (BITS == 4) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(row + g * 16));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(b, mask), hi = _mm_and_si128(_mm_srli_epi16(b, 4), mask);
    if constexpr (L == 16) {
      q[0] = Vec::u8(lo);
      q[1] = Vec::u8(hi);
    } else {
      q[0] = Vec::u8(lo);
      q[1] = Vec::u8(_mm_srli_si128(lo, 8));
      q[2] = Vec::u8(hi);
      q[3] = Vec::u8(_mm_srli_si128(hi, 8));
    }
  } else {
    for (int v = 0; v < G / L; ++v) q[v] = Vec::load(reinterpret_cast<const int8_t*>(row) + g * G + v * L);
  }
  if constexpr (MIN) {
    const Reg vm = Vec::set1(m);
    for (int v = 0; v < G / L; ++v) w[v] = Vec::fma(q[v], vs, vm);
  } else {
    for (int v = 0; v < G / L; ++v) w[v] = Vec::mul(q[v], vs);
  }
}

// R activation rows (R <= RMAX) times one weight row: the row's groups in order, each rebuilt once and
// multiplied into the R rows, two accumulator chains per activation row, and the weight row PF
// ahead prefetched. Interleaving 4 weight rows instead (one activation load for 4 of them) ran the
// Gemma 3 head's Q8_0 blocks (262144 x 640) at 17-18 G weights/s on 2 Zen 4 cores at batch 1,
// this order at 25-28: one row streamed at a time is what the hardware prefetcher follows best.
// Every activation row's sum has the same order whatever R is, so a row's result does not depend
// on the batch it decodes in.
constexpr int PF = 4;

template <int R, int BITS, int G, bool MIN, class O>
inline void row_r(const Blocks& b, int64_t n, const float* x, int64_t K, O* out, int64_t ldo) {
  constexpr int V = G / L;  // registers per group
  const uint8_t* row = b.codes + n * b.row_bytes;
  const float* s = b.scale + n * b.ng;
  const float* m = MIN ? b.min + n * b.ng : nullptr;
  Reg acc[2][R];
  for (int c = 0; c < 2; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = Vec::zero();
  // group g into chains c, c ^ 1, ... (one chain per register of the group, alternating)
  const auto group = [&](int64_t g, int c) {
    _mm_prefetch(reinterpret_cast<const char*>(row + PF * b.row_bytes + g * G * BITS / 8), _MM_HINT_T0);
    Reg w[V];
    decode<BITS, G, MIN>(row, g, s[g], MIN ? m[g] : 0.f, w);
    if (b.bf16)
      for (int v = 0; v < V; ++v) w[v] = Vec::round_bf16(w[v]);
    for (int v = 0; v < V; ++v)
      for (int r = 0; r < R; ++r) {
        Reg& a = acc[(c + v) % 2][r];
        a = Vec::fma(w[v], Vec::load(x + r * K + g * G + v * L), a);
      }
  };
  int64_t g = 0;
  if constexpr (V == 1) {  // one register per group: alternate the chains between groups
    for (; g + 2 <= b.ng; g += 2) {
      group(g, 0);
      group(g + 1, 1);
    }
  }
  for (; g < b.ng; ++g) group(g, 0);
  for (int r = 0; r < R; ++r) out[r * ldo] = static_cast<O>(Vec::sum(Vec::add(acc[0][r], acc[1][r])));
}

#if defined(__AVX512BF16__)
// bf16 activations where the CPU has AVX512-BF16: every 32 rebuilt weights are rounded to bf16 by one
// vcvtne2ps2bf16 (to nearest even, as .to(bfloat16)) and multiplied by 32 activations in pairs by
// one vdpbf16ps, the arithmetic of the dense bf16 model's kernel (skinny_gemm.cpp); rounding in
// fp32 registers and FMAs instead ran at 80 against the dense model's 93 tok/s (SmolLM2)
template <int R, int BITS, int G, bool MIN, class O>
inline void row_r(const Blocks& b, int64_t n, const uint16_t* x, int64_t K, O* out, int64_t ldo) {
  constexpr int GP = 32 / G;  // groups per 32 weights
  const uint8_t* row = b.codes + n * b.row_bytes;
  const float* s = b.scale + n * b.ng;
  const float* m = MIN ? b.min + n * b.ng : nullptr;
  __m512 acc[2][R];
  for (int c = 0; c < 2; ++c)
    for (int r = 0; r < R; ++r) acc[c][r] = _mm512_setzero_ps();
  const auto step = [&](int64_t g, int c) {  // the 32 weights from group g on, into chain c
    _mm_prefetch(reinterpret_cast<const char*>(row + PF * b.row_bytes + g * G * BITS / 8), _MM_HINT_T0);
    Reg f[2];
    for (int p = 0; p < GP; ++p) decode<BITS, G, MIN>(row, g + p, s[g + p], MIN ? m[g + p] : 0.f, f + p);
    const __m512bh w = _mm512_cvtne2ps_pbh(f[1], f[0]);
    for (int r = 0; r < R; ++r)
      acc[c][r] = _mm512_dpbf16_ps(acc[c][r], w, (__m512bh)_mm512_loadu_si512(x + r * K + g * G));
  };
  int64_t g = 0;
  for (; g + 2 * GP <= b.ng; g += 2 * GP) {
    step(g, 0);
    step(g + GP, 1);
  }
  if (g < b.ng) step(g, 0);
  for (int r = 0; r < R; ++r) out[r * ldo] = static_cast<O>(_mm512_reduce_add_ps(_mm512_add_ps(acc[0][r], acc[1][r])));
}
#endif

// activation rows per pass: 2 chains x RMAX accumulators + the group's weights fit the registers
// (32 zmm / 16 ymm)
constexpr int RMAX = L == 16 ? 8 : 4;

template <int BITS, int G, bool MIN, class X, class O>
inline void row_any(int64_t R, const Blocks& b, int64_t n, const X* x, int64_t K, O* out, int64_t ldo) {
  switch (R) {
    case 1: return row_r<1, BITS, G, MIN, O>(b, n, x, K, out, ldo);
    case 2: return row_r<2, BITS, G, MIN, O>(b, n, x, K, out, ldo);
    case 3: return row_r<3, BITS, G, MIN, O>(b, n, x, K, out, ldo);
    case 4: return row_r<4, BITS, G, MIN, O>(b, n, x, K, out, ldo);
    case 5: return row_r<RMAX >= 5 ? 5 : 1, BITS, G, MIN, O>(b, n, x, K, out, ldo);
    case 6: return row_r<RMAX >= 6 ? 6 : 1, BITS, G, MIN, O>(b, n, x, K, out, ldo);
    case 7: return row_r<RMAX >= 7 ? 7 : 1, BITS, G, MIN, O>(b, n, x, K, out, ldo);
    default: return row_r<RMAX, BITS, G, MIN, O>(b, n, x, K, out, ldo);
  }
}

// output columns n0..n1 for all M rows: one weight row at a time, activation rows in passes of RMAX
template <int BITS, int G, bool MIN, class X, class O>
void rows(const Blocks& b, const X* x, int64_t M, int64_t K, O* out, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < M; r += RMAX)
      row_any<BITS, G, MIN>(std::min<int64_t>(RMAX, M - r), b, n, x + r * K, K, out + r * N + n, N);
}

// rows n0..n1 of the weights into out (N, K): float32, or bf16 bits (b.bf16: each weight rounded
// to nearest even, as .to(torch.bfloat16) rounds the float32 one)
template <int BITS, int G, bool MIN, class O>
void dequant_rows(const Blocks& b, O* out, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t g = 0; g < b.ng; ++g) {
      const int64_t i = n * b.ng + g;
      Reg w[G / L];
      decode<BITS, G, MIN>(b.codes + n * b.row_bytes, g, b.scale[i], MIN ? b.min[i] : 0.f, w);
      if (b.bf16)
        for (int v = 0; v < G / L; ++v) w[v] = Vec::round_bf16(w[v]);
      for (int v = 0; v < G / L; ++v) Vec::store(out + n * K + g * G + v * L, w[v]);
    }
}

#if defined(__AVX512F__)
// More activation rows (a short prompt, a wide batch), fp32: a matmul that rebuilds each weight once
// per panel of NW outputs into a small buffer (L1/L2) instead of writing the whole (N, K) float32
// weight and reading it back for the float matmul (~10% of each product at 256 rows). Measured on
// one AVX-512 core (SmolLM2's 3072 x 576 gate_up): 12-20% faster than that for 64-128 rows, 5% slower
// at 256, 30% at 1024, where MKL's kernel (~80% of peak against this one's ~65%) wins; so
// BlockLinear (evolm/quant/blocks.py, GEMM_ROWS) uses it up to 128 rows. Here:
// - the activations are packed once per call in tiles of MR rows, k-major: xp[t][k][i] = x[t*MR + i][k]
//   (rows past M zero), so a tile's MR values at step k sit in one cache line;
// - each panel of up to NW = NV vectors of outputs is rebuilt (decode) and transposed (16 x 16 in
//   registers) to k-major: wp[k][j] = w[n0 + j][k] (outputs past N zero);
// - a tile times a panel keeps MR x NV accumulators; each step k loads the panel's NV vectors and
//   broadcasts the tile's MR activations into MR x NV FMAs (the usual register-blocked GEMM).
// Every output sums its K products in order k = 0, 1, ..., one FMA each: F.linear's result on the
// dequantized weights up to the order of the fp32 sums.
constexpr int MR = 8, NV = 3, NW = NV * L;  // 24 accumulators + 3 weight vectors of 32 registers

// the rebuilt weight row n (K floats) into dst
template <int BITS, int G, bool MIN>
inline void dequant_row(const Blocks& b, int64_t n, float* dst) {
  for (int64_t g = 0; g < b.ng; ++g) {
    const int64_t i = n * b.ng + g;
    Reg w[G / L];
    decode<BITS, G, MIN>(b.codes + n * b.row_bytes, g, b.scale[i], MIN ? b.min[i] : 0.f, w);
    for (int v = 0; v < G / L; ++v) Vec::store(dst + g * G + v * L, w[v]);
  }
}

// r[i][j] -> r[j][i] for a 16 x 16 block in 16 registers
inline void transpose16(__m512* r) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  const auto lo = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
  const auto hi = [](__m512 a, __m512 b) { return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))); };
  for (int i = 0; i < 16; i += 4) {
    r[i] = lo(t[i], t[i + 2]);
    r[i + 1] = hi(t[i], t[i + 2]);
    r[i + 2] = lo(t[i + 1], t[i + 3]);
    r[i + 3] = hi(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8)
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xdd);
  }
}

// outputs n0 .. n0 + p (p <= NW) rebuilt into wp[k][j] (k-major, NW wide, zero past p); rows: (NW, K) scratch
template <int BITS, int G, bool MIN>
void pack_panel(const Blocks& b, int64_t n0, int64_t p, int64_t K, float* rows, float* wp) {
  for (int64_t j = 0; j < NW; ++j) {
    if (j < p) dequant_row<BITS, G, MIN>(b, n0 + j, rows + j * K);
    else std::fill(rows + j * K, rows + (j + 1) * K, 0.f);
  }
  for (int v = 0; v < NV; ++v)
    for (int64_t k = 0; k < K; k += 16) {  // K is a multiple of the group (16 or 32)
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(rows + (v * 16 + i) * K + k);
      transpose16(r);
      for (int i = 0; i < 16; ++i) _mm512_storeu_ps(wp + (k + i) * NW + v * 16, r[i]);
    }
}

// y[i][j] (i < mr rows, j < p outputs, row stride ldy) += sum_k xt[k][i] * wp[k][j] over kc steps
// (first: y starts at 0). The sums go on from y's partial ones, in order of k, as one FMA chain.
inline void tile(const float* xt, const float* wp, int64_t kc, float* y, int64_t ldy, int64_t mr, int64_t p,
                 bool first) {
  __m512 acc[MR][NV];
  const __mmask16 tail = static_cast<__mmask16>((1u << (p % 16)) - 1);
  const auto mask = [&](int v) -> __mmask16 { return p >= (v + 1) * 16 ? 0xFFFF : (p > v * 16 ? tail : 0); };
  for (int i = 0; i < MR; ++i)
    for (int v = 0; v < NV; ++v)
      acc[i][v] = first || i >= mr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask(v), y + i * ldy + v * 16);
  for (int64_t k = 0; k < kc; ++k) {
    __m512 w[NV];
    for (int v = 0; v < NV; ++v) w[v] = _mm512_loadu_ps(wp + k * NW + v * 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 xi = _mm512_set1_ps(xt[k * MR + i]);
      for (int v = 0; v < NV; ++v) acc[i][v] = _mm512_fmadd_ps(xi, w[v], acc[i][v]);
    }
  }
  for (int i = 0; i < mr; ++i)
    for (int v = 0; v < NV; ++v) _mm512_mask_storeu_ps(y + i * ldy + v * 16, mask(v), acc[i][v]);
}

// steps of k per pass over the rows: a panel's KC x NW weights (24 KB) stay in L1 while every tile
// of rows streams past them (the rows' KC x MR values are read once, sequentially)
constexpr int64_t KC = 128;

// outputs n0..n1 for all M rows (xp: the packed activations)
template <int BITS, int G, bool MIN>
void gemm_cols(const Blocks& b, const float* xp, int64_t M, int64_t K, float* y, int64_t N, int64_t n0, int64_t n1) {
  std::vector<float> rows(NW * K), wp(NW * K);
  for (int64_t n = n0; n < n1; n += NW) {
    const int64_t p = std::min<int64_t>(NW, n1 - n);
    pack_panel<BITS, G, MIN>(b, n, p, K, rows.data(), wp.data());
    for (int64_t k0 = 0; k0 < K; k0 += KC)
      for (int64_t m = 0; m < M; m += MR)
        tile(xp + m * K + k0 * MR, wp.data() + k0 * NW, std::min(KC, K - k0), y + m * N + n, N,
             std::min<int64_t>(MR, M - m), p, k0 == 0);
  }
}
#endif  // __AVX512F__
#else
template <int BITS, int G, bool MIN, class X, class O>
void rows(const Blocks& b, const X* x, int64_t M, int64_t K, O* out, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t r = 0; r < M; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += weight_at<BITS, G>(b, n, k) * x[r * K + k];
      out[r * N + n] = static_cast<O>(s);
    }
}

template <int BITS, int G, bool MIN, class O>
void dequant_rows(const Blocks& b, O* out, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const float w = weight_at<BITS, G>(b, n, k);  // already rounded to bf16 for b.bf16
      if constexpr (std::is_same_v<O, uint16_t>) out[n * K + k] = c10::BFloat16(w).x;
      else out[n * K + k] = w;
    }
}
#endif

// the (bits, group, min) variant of a kernel, chosen once per call
template <class F>
void dispatch(int bits, int64_t group, bool has_min, F&& f) {
  if (bits == 4) {
    if (has_min) f(std::integral_constant<int, 4>{}, std::integral_constant<int, 32>{}, std::true_type{});
    else f(std::integral_constant<int, 4>{}, std::integral_constant<int, 32>{}, std::false_type{});
  } else if (group == 16) {
    if (has_min) f(std::integral_constant<int, 8>{}, std::integral_constant<int, 16>{}, std::true_type{});
    else f(std::integral_constant<int, 8>{}, std::integral_constant<int, 16>{}, std::false_type{});
  } else {
    if (has_min) f(std::integral_constant<int, 8>{}, std::integral_constant<int, 32>{}, std::true_type{});
    else f(std::integral_constant<int, 8>{}, std::integral_constant<int, 32>{}, std::false_type{});
  }
}

// checks the layout; returns (K, bits)
std::pair<int64_t, int> check(const at::Tensor& codes, const at::Tensor& scale, const std::optional<at::Tensor>& min,
                              int64_t group, const char* op) {
  TORCH_CHECK(codes.dim() == 2 && codes.is_contiguous() &&
                  (codes.scalar_type() == at::kByte || codes.scalar_type() == at::kChar),
              "evolm ", op, ": codes must be contiguous (N, K/2) uint8 (4-bit) or (N, K) int8 (8-bit), got ",
              codes.scalar_type(), " ", codes.sizes());
  const int bits = codes.scalar_type() == at::kByte ? 4 : 8;
  const int64_t K = bits == 4 ? codes.size(1) * 2 : codes.size(1), N = codes.size(0);
  TORCH_CHECK((bits == 4 && group == 32) || (bits == 8 && (group == 16 || group == 32)),
              "evolm ", op, ": groups of ", group, " inputs are not supported with ", bits,
              "-bit codes (4-bit: 32; 8-bit: 16 or 32)");
  TORCH_CHECK(K % group == 0, "evolm ", op, ": ", K, " inputs are not a multiple of the group size ", group);
  const auto ok = [&](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 && t.size(0) == N && t.size(1) == K / group;
  };
  TORCH_CHECK(ok(scale), "evolm ", op, ": scale must be contiguous float32 (", N, ", ", K / group, "), got ",
              scale.scalar_type(), " ", scale.sizes());
  TORCH_CHECK(!min.has_value() || ok(*min), "evolm ", op, ": min must be contiguous float32 (", N, ", ",
              K / group, "), got ", min->scalar_type(), " ", min->sizes());
  return {K, bits};
}

Blocks blocks_of(const at::Tensor& codes, const at::Tensor& scale, const std::optional<at::Tensor>& min, bool bf16) {
  return Blocks{reinterpret_cast<const uint8_t*>(codes.data_ptr()), codes.size(1), scale.data_ptr<float>(),
                min.has_value() ? min->data_ptr<float>() : nullptr, scale.size(1), bf16};
}

}  // namespace

// x (M, K) fp32 or bf16 -> (M, N) in x's dtype: fp32 arithmetic with the weights fma(code, scale, min),
// rounded to bf16 for bf16 activations (the weights of the bf16 model; bf16 x bf16 products are exact
// in fp32), i.e. F.linear of the dequantized model in x's dtype up to the order of the fp32 sums
at::Tensor blocks_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                         const std::optional<at::Tensor>& min, int64_t group) {
  const auto [K, bits] = check(codes, scale, min, group, "blocks_linear");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "evolm blocks_linear: x must be (M, ", K, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "evolm blocks_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t M = x.size(0), N = codes.size(0);
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  // bf16 results are written by the kernel (one rounding, as .to(bfloat16), without a second pass)
  at::Tensor out = at::empty({M, N}, x.options());
  const Blocks b = blocks_of(codes, scale, min, bf16);
  const int64_t grain = std::max<int64_t>(16, (N / (4 * at::get_num_threads())) & ~int64_t(3));
  const auto product = [&](const auto* xp) {
    dispatch(bits, group, min.has_value(), [&](auto BITS, auto G, auto MIN) {
      at::parallel_for(0, N, grain, [&](int64_t a, int64_t c) {
        constexpr int bits_ = decltype(BITS)::value, g_ = decltype(G)::value;
        constexpr bool min_ = decltype(MIN)::value;
        if (bf16) rows<bits_, g_, min_>(b, xp, M, K, out.data_ptr<at::BFloat16>(), N, a, c);
        else rows<bits_, g_, min_>(b, xp, M, K, out.data_ptr<float>(), N, a, c);
      });
    });
  };
#if defined(__AVX512BF16__)
  if (bf16 && K % 32 == 0) {  // bf16 pairs (32 weights a step)
    const at::Tensor xc = x.contiguous();
    product(reinterpret_cast<const uint16_t*>(xc.data_ptr<at::BFloat16>()));
    return out;
  }
#endif
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  product(xf.data_ptr<float>());
  return out;
}

// the (N, K) weights the blocks hold, float32 or (bf16) rounded to bfloat16 (prefill multiplies many
// rows: it rebuilds them, then uses the float matmul), rebuilt by the same code as blocks_linear's;
// bf16 directly, without a float32 tensor written and read again by .to(bfloat16)
// rebuild the blocks' (N, K) weights into out (float32, or bf16 rounded), rows in parallel
void dequantize_into(const at::Tensor& codes, const at::Tensor& scale, const std::optional<at::Tensor>& min,
                     int64_t group, int64_t K, int bits, const at::Tensor& out) {
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  const Blocks b = blocks_of(codes, scale, min, bf16);
  dispatch(bits, group, min.has_value(), [&](auto BITS, auto G, auto MIN) {
    at::parallel_for(0, codes.size(0), 64, [&](int64_t a, int64_t c) {
      constexpr int bits_ = decltype(BITS)::value, g_ = decltype(G)::value;
      constexpr bool min_ = decltype(MIN)::value;
      if (bf16) dequant_rows<bits_, g_, min_>(b, reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()), K, a, c);
      else dequant_rows<bits_, g_, min_>(b, out.data_ptr<float>(), K, a, c);
    });
  });
}

at::Tensor blocks_dequantize(const at::Tensor& codes, const at::Tensor& scale, const std::optional<at::Tensor>& min,
                             int64_t group, bool bf16) {
  const auto [K, bits] = check(codes, scale, min, group, "blocks_dequantize");
  at::Tensor out = at::empty({codes.size(0), K}, scale.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  dequantize_into(codes, scale, min, group, K, bits, out);
  return out;
}

// a prompt's product: x (M, K) @ W^T with W rebuilt as blocks_dequantize does, into a buffer this thread
// keeps (grown to the largest weight up to SCRATCH_BYTES, larger ones get a fresh tensor). A fresh tensor
// per product cost more than the rebuilding itself: each multi-MB allocation comes back from the OS
// as new pages, faulted in as they are written (measured on a 2-core Xeon, a SmolLM2 layer's 7
// products at 256 rows: 7.0 ms dense, 11.2 ms with a fresh rebuilt weight each, ~8 ms reusing one).
constexpr int64_t SCRATCH_BYTES = int64_t(64) << 20;

at::Tensor blocks_dense_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                               const std::optional<at::Tensor>& min, int64_t group) {
  const auto [K, bits] = check(codes, scale, min, group, "blocks_dense_linear");
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && (bf16 || x.scalar_type() == at::kFloat),
              "evolm blocks_dense_linear: x must be float32 or bfloat16 (M, ", K, "), got ", x.scalar_type(), " ",
              x.sizes());
  const int64_t N = codes.size(0), bytes = N * K * (bf16 ? 2 : 4);
  if (bytes > SCRATCH_BYTES) return at::linear(x, blocks_dequantize(codes, scale, min, group, bf16));
  thread_local at::Tensor scratch;  // bytes, reused by every layer this thread multiplies
  if (!scratch.defined() || scratch.numel() < bytes) scratch = at::empty({bytes}, scale.options().dtype(at::kByte));
  const at::Tensor w = at::from_blob(scratch.data_ptr(), {N, K}, scale.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  dequantize_into(codes, scale, min, group, K, bits, w);
  return at::linear(x, w);
}

// x (M, K) float32 -> (M, N) float32 for more rows than blocks_linear's (a short prompt): F.linear of
// the rebuilt weights up to the order of the fp32 sums, without writing them out (gemm_cols; without
// AVX-512, the rebuilt weights and at::linear). Each row's sums do not depend on the other rows.
at::Tensor blocks_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const std::optional<at::Tensor>& min, int64_t group) {
  const auto [K, bits] = check(codes, scale, min, group, "blocks_gemm");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K && x.scalar_type() == at::kFloat,
              "evolm blocks_gemm: x must be float32 (M, ", K, "), got ", x.scalar_type(), " ", x.sizes());
#if defined(__AVX512F__)
  const int64_t M = x.size(0), N = codes.size(0), tiles = (M + MR - 1) / MR;
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  // the activations in tiles of MR rows, k-major: xp[t][k][i] = x[t * MR + i][k] (zero past M)
  const at::Tensor xc = x.contiguous();
  at::Tensor xp = at::empty({tiles, K, MR}, x.options());
  const float* xs = xc.data_ptr<float>();
  float* xd = xp.data_ptr<float>();
  at::parallel_for(0, tiles, 16, [&](int64_t a, int64_t c) {
    for (int64_t t = a; t < c; ++t) {
      float* dst = xd + t * K * MR;
      for (int64_t i = 0; i < MR; ++i) {
        const int64_t m = t * MR + i;
        for (int64_t k = 0; k < K; ++k) dst[k * MR + i] = m < M ? xs[m * K + k] : 0.f;
      }
    }
  });
  const Blocks b = blocks_of(codes, scale, min, false);
  const int64_t panels = (N + NW - 1) / NW;
  float* y = out.data_ptr<float>();
  dispatch(bits, group, min.has_value(), [&](auto BITS, auto G, auto MIN) {
    at::parallel_for(0, panels, 1, [&](int64_t a, int64_t c) {
      constexpr int bits_ = decltype(BITS)::value, g_ = decltype(G)::value;
      constexpr bool min_ = decltype(MIN)::value;
      gemm_cols<bits_, g_, min_>(b, xd, M, K, y, N, a * NW, std::min(N, c * NW));
    });
  });
  return out;
#else
  return blocks_dense_linear(x, codes, scale, min, group);
#endif
}

TORCH_LIBRARY_FRAGMENT(evolm_f, lib) {
  lib.def("blocks_gemm(Tensor x, Tensor codes, Tensor scale, Tensor? min, int group) -> Tensor");
  lib.def("blocks_linear(Tensor x, Tensor codes, Tensor scale, Tensor? min, int group) -> Tensor");
  lib.def("blocks_dense_linear(Tensor x, Tensor codes, Tensor scale, Tensor? min, int group) -> Tensor");
  lib.def("blocks_dequantize(Tensor codes, Tensor scale, Tensor? min, int group, bool bf16=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(evolm_f, CPU, lib) {
  lib.impl("blocks_linear", &blocks_linear);
  lib.impl("blocks_dequantize", &blocks_dequantize);
  lib.impl("blocks_gemm", &blocks_gemm);
  lib.impl("blocks_dense_linear", &blocks_dense_linear);
}
