// A minimal SIMD layer for the kernels: one vector type per (ISA, dtype).
//
// Compiled once per ISA (FASTNN_ISA_NS); everything here lives in that ISA's
// namespace so the per-ISA copies of these inline functions never merge at link
// time (an AVX-512 copy picked for the baseline table would crash old CPUs).
//
//   AVX-512 build : __m512 / __m512d   (16 / 8 lanes)
//   AVX2 build    : __m256 / __m256d   (8 / 4 lanes)
//   x86 baseline  : __m128 / __m128d   (SSE2 is part of x86-64)
//   other CPUs    : scalar, 1 lane
//
// Only what the kernels need: unaligned and partial (tail) loads/stores that
// never touch memory past the given count, fma, NaN-aware max, masks/select,
// horizontal sum, and even/odd (de)interleaving for stride-2 pooling.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
// GCC 12's AVX-512 headers trip -W(maybe-)uninitialized on their own
// _mm512_undefined_*() (GCC bug 105593); silence it for the intrinsics only.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif

#ifndef FASTNN_ISA_NS
#error "FASTNN_ISA_NS must name the ISA namespace (set by CMakeLists.txt)"
#endif

namespace fastnn {
namespace FASTNN_ISA_NS {
namespace simd {

// Vector registers the kernels may plan their register blocking around.
#if defined(__AVX512F__)
constexpr int kVecRegs = 32;
#else
constexpr int kVecRegs = 16;
#endif

template <typename T>
struct Vec;

#if defined(__AVX512F__) && defined(__AVX512DQ__)

template <>
struct Vec<float> {
  using reg = __m512;
  using mask = __mmask16;
  static constexpr int L = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg set1(float x) { return _mm512_set1_ps(x); }
  static reg loadu(const float* p) { return _mm512_loadu_ps(p); }
  static void storeu(float* p, reg v) { _mm512_storeu_ps(p, v); }
  // Partial loads/stores take 0 <= n <= L elements.
  static mask tail(int64_t n) { return static_cast<mask>((1u << n) - 1u); }
  // Masked loads suppress faults on the lanes that are off.
  static reg loadp(const float* p, int64_t n) { return _mm512_maskz_loadu_ps(tail(n), p); }
  static void storep(float* p, reg v, int64_t n) { _mm512_mask_storeu_ps(p, tail(n), v); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static mask gt(reg a, reg b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static mask isnan(reg a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static mask mand(mask a, mask b) { return static_cast<mask>(a & b); }
  static mask mor(mask a, mask b) { return static_cast<mask>(a | b); }
  static mask mandnot(mask a, mask b) { return static_cast<mask>(~a & b); }  // !a & b
  static reg select(mask m, reg a, reg b) { return _mm512_mask_blend_ps(m, b, a); }
  static float hsum(reg v) { return _mm512_reduce_add_ps(v); }
  // (lo, hi) hold 2L consecutive elements; even/odd get elements 0,2,4.. / 1,3,5..
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26,
                                         28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27,
                                         29, 31);
    even = _mm512_permutex2var_ps(lo, ie, hi);
    odd = _mm512_permutex2var_ps(lo, io, hi);
  }
  // Like deinterleave, but the pairs come out in a fixed non-ascending lane
  // order (in-lane shuffles: no index registers, and no contention with the
  // FMA pipes, unlike the 2-source permutes on Zen 4). For lane-wise work
  // where both operands went through unzip, so their lanes match.
  static void unzip(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm512_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
    odd = _mm512_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  }
  static void interleave(reg even, reg odd, reg& lo, reg& hi) {
    const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7,
                                         23);
    const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14,
                                         30, 15, 31);
    lo = _mm512_permutex2var_ps(even, il, odd);
    hi = _mm512_permutex2var_ps(even, ih, odd);
  }
};

template <>
struct Vec<double> {
  using reg = __m512d;
  using mask = __mmask8;
  static constexpr int L = 8;
  static reg zero() { return _mm512_setzero_pd(); }
  static reg set1(double x) { return _mm512_set1_pd(x); }
  static reg loadu(const double* p) { return _mm512_loadu_pd(p); }
  static void storeu(double* p, reg v) { _mm512_storeu_pd(p, v); }
  static mask tail(int64_t n) { return static_cast<mask>((1u << n) - 1u); }
  static reg loadp(const double* p, int64_t n) { return _mm512_maskz_loadu_pd(tail(n), p); }
  static void storep(double* p, reg v, int64_t n) { _mm512_mask_storeu_pd(p, tail(n), v); }
  static reg add(reg a, reg b) { return _mm512_add_pd(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm512_mul_pd(a, b); }
  static reg div(reg a, reg b) { return _mm512_div_pd(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_pd(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_pd(a, b); }
  static mask gt(reg a, reg b) { return _mm512_cmp_pd_mask(a, b, _CMP_GT_OQ); }
  static mask isnan(reg a) { return _mm512_cmp_pd_mask(a, a, _CMP_UNORD_Q); }
  static mask mand(mask a, mask b) { return static_cast<mask>(a & b); }
  static mask mor(mask a, mask b) { return static_cast<mask>(a | b); }
  static mask mandnot(mask a, mask b) { return static_cast<mask>(~a & b); }
  static reg select(mask m, reg a, reg b) { return _mm512_mask_blend_pd(m, b, a); }
  static double hsum(reg v) { return _mm512_reduce_add_pd(v); }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    const __m512i ie = _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14);
    const __m512i io = _mm512_setr_epi64(1, 3, 5, 7, 9, 11, 13, 15);
    even = _mm512_permutex2var_pd(lo, ie, hi);
    odd = _mm512_permutex2var_pd(lo, io, hi);
  }
  static void unzip(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm512_shuffle_pd(lo, hi, 0x00);
    odd = _mm512_shuffle_pd(lo, hi, 0xff);
  }
  static void interleave(reg even, reg odd, reg& lo, reg& hi) {
    const __m512i il = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
    const __m512i ih = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
    lo = _mm512_permutex2var_pd(even, il, odd);
    hi = _mm512_permutex2var_pd(even, ih, odd);
  }
};

#elif defined(__AVX2__) && defined(__FMA__)

template <>
struct Vec<float> {
  using reg = __m256;
  using mask = __m256;  // all-ones / all-zeros lanes
  static constexpr int L = 8;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg set1(float x) { return _mm256_set1_ps(x); }
  static reg loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static __m256i tail(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  }
  // vmaskmov suppresses faults on masked-off lanes.
  static reg loadp(const float* p, int64_t n) { return _mm256_maskload_ps(p, tail(n)); }
  static void storep(float* p, reg v, int64_t n) { _mm256_maskstore_ps(p, tail(n), v); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static mask gt(reg a, reg b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static mask isnan(reg a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static mask mand(mask a, mask b) { return _mm256_and_ps(a, b); }
  static mask mor(mask a, mask b) { return _mm256_or_ps(a, b); }
  static mask mandnot(mask a, mask b) { return _mm256_andnot_ps(a, b); }
  static reg select(mask m, reg a, reg b) { return _mm256_blendv_ps(b, a, m); }
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    // shuffle works per 128-bit lane: [a0 a2 b0 b2 | a4 a6 b4 b6]; then fix the
    // 64-bit quarter order to [a0 a2 a4 a6 b0 b2 b4 b6].
    const __m256 e = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
    const __m256 o = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
    even = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e), _MM_SHUFFLE(3, 1, 2, 0)));
    odd = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0)));
  }
  static void unzip(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
    odd = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  }
  static void interleave(reg even, reg odd, reg& lo, reg& hi) {
    const __m256 l = _mm256_unpacklo_ps(even, odd);  // e0 o0 e1 o1 | e4 o4 e5 o5
    const __m256 h = _mm256_unpackhi_ps(even, odd);  // e2 o2 e3 o3 | e6 o6 e7 o7
    lo = _mm256_permute2f128_ps(l, h, 0x20);
    hi = _mm256_permute2f128_ps(l, h, 0x31);
  }
};

template <>
struct Vec<double> {
  using reg = __m256d;
  using mask = __m256d;
  static constexpr int L = 4;
  static reg zero() { return _mm256_setzero_pd(); }
  static reg set1(double x) { return _mm256_set1_pd(x); }
  static reg loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void storeu(double* p, reg v) { _mm256_storeu_pd(p, v); }
  static __m256i tail(int64_t n) {
    return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
  }
  static reg loadp(const double* p, int64_t n) { return _mm256_maskload_pd(p, tail(n)); }
  static void storep(double* p, reg v, int64_t n) { _mm256_maskstore_pd(p, tail(n), v); }
  static reg add(reg a, reg b) { return _mm256_add_pd(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm256_mul_pd(a, b); }
  static reg div(reg a, reg b) { return _mm256_div_pd(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_pd(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_pd(a, b); }
  static mask gt(reg a, reg b) { return _mm256_cmp_pd(a, b, _CMP_GT_OQ); }
  static mask isnan(reg a) { return _mm256_cmp_pd(a, a, _CMP_UNORD_Q); }
  static mask mand(mask a, mask b) { return _mm256_and_pd(a, b); }
  static mask mor(mask a, mask b) { return _mm256_or_pd(a, b); }
  static mask mandnot(mask a, mask b) { return _mm256_andnot_pd(a, b); }
  static reg select(mask m, reg a, reg b) { return _mm256_blendv_pd(b, a, m); }
  static double hsum(reg v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    s = _mm_add_sd(s, _mm_unpackhi_pd(s, s));
    return _mm_cvtsd_f64(s);
  }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    // unpack: [a0 b0 a2 b2] / [a1 b1 a3 b3]; permute to [a0 a2 b0 b2] / [a1 a3 b1 b3].
    even = _mm256_permute4x64_pd(_mm256_unpacklo_pd(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
    odd = _mm256_permute4x64_pd(_mm256_unpackhi_pd(lo, hi), _MM_SHUFFLE(3, 1, 2, 0));
  }
  static void unzip(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm256_unpacklo_pd(lo, hi);
    odd = _mm256_unpackhi_pd(lo, hi);
  }
  static void interleave(reg even, reg odd, reg& lo, reg& hi) {
    const __m256d l = _mm256_unpacklo_pd(even, odd);  // e0 o0 e2 o2
    const __m256d h = _mm256_unpackhi_pd(even, odd);  // e1 o1 e3 o3
    lo = _mm256_permute2f128_pd(l, h, 0x20);
    hi = _mm256_permute2f128_pd(l, h, 0x31);
  }
};

#elif defined(__SSE2__)

template <>
struct Vec<float> {
  using reg = __m128;
  using mask = __m128;
  static constexpr int L = 4;
  static reg zero() { return _mm_setzero_ps(); }
  static reg set1(float x) { return _mm_set1_ps(x); }
  static reg loadu(const float* p) { return _mm_loadu_ps(p); }
  static void storeu(float* p, reg v) { _mm_storeu_ps(p, v); }
  // SSE2 has no masked moves: go through a small stack buffer.
  static reg loadp(const float* p, int64_t n) {
    alignas(16) float t[4] = {0.f, 0.f, 0.f, 0.f};
    if (n > 0) std::memcpy(t, p, static_cast<size_t>(n) * sizeof(float));
    return _mm_load_ps(t);
  }
  static void storep(float* p, reg v, int64_t n) {
    alignas(16) float t[4];
    _mm_store_ps(t, v);
    if (n > 0) std::memcpy(p, t, static_cast<size_t>(n) * sizeof(float));
  }
  static reg add(reg a, reg b) { return _mm_add_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm_sub_ps(a, b); }
  static reg mul(reg a, reg b) { return _mm_mul_ps(a, b); }
  static reg div(reg a, reg b) { return _mm_div_ps(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm_add_ps(_mm_mul_ps(a, b), c); }
  static reg max(reg a, reg b) { return _mm_max_ps(a, b); }
  static mask gt(reg a, reg b) { return _mm_cmpgt_ps(a, b); }
  static mask isnan(reg a) { return _mm_cmpunord_ps(a, a); }
  static mask mand(mask a, mask b) { return _mm_and_ps(a, b); }
  static mask mor(mask a, mask b) { return _mm_or_ps(a, b); }
  static mask mandnot(mask a, mask b) { return _mm_andnot_ps(a, b); }
  static reg select(mask m, reg a, reg b) {
    return _mm_or_ps(_mm_and_ps(m, a), _mm_andnot_ps(m, b));
  }
  static float hsum(reg v) {
    __m128 s = _mm_add_ps(v, _mm_movehl_ps(v, v));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
    odd = _mm_shuffle_ps(lo, hi, _MM_SHUFFLE(3, 1, 3, 1));
  }
  static void unzip(reg lo, reg hi, reg& even, reg& odd) { deinterleave(lo, hi, even, odd); }
  static void interleave(reg even, reg odd, reg& lo, reg& hi) {
    lo = _mm_unpacklo_ps(even, odd);
    hi = _mm_unpackhi_ps(even, odd);
  }
};

template <>
struct Vec<double> {
  using reg = __m128d;
  using mask = __m128d;
  static constexpr int L = 2;
  static reg zero() { return _mm_setzero_pd(); }
  static reg set1(double x) { return _mm_set1_pd(x); }
  static reg loadu(const double* p) { return _mm_loadu_pd(p); }
  static void storeu(double* p, reg v) { _mm_storeu_pd(p, v); }
  static reg loadp(const double* p, int64_t n) {
    return n >= 2 ? _mm_loadu_pd(p) : n == 1 ? _mm_load_sd(p) : _mm_setzero_pd();
  }
  static void storep(double* p, reg v, int64_t n) {
    if (n >= 2) {
      _mm_storeu_pd(p, v);
    } else if (n == 1) {
      _mm_store_sd(p, v);
    }
  }
  static reg add(reg a, reg b) { return _mm_add_pd(a, b); }
  static reg sub(reg a, reg b) { return _mm_sub_pd(a, b); }
  static reg mul(reg a, reg b) { return _mm_mul_pd(a, b); }
  static reg div(reg a, reg b) { return _mm_div_pd(a, b); }
  static reg fma(reg a, reg b, reg c) { return _mm_add_pd(_mm_mul_pd(a, b), c); }
  static reg max(reg a, reg b) { return _mm_max_pd(a, b); }
  static mask gt(reg a, reg b) { return _mm_cmpgt_pd(a, b); }
  static mask isnan(reg a) { return _mm_cmpunord_pd(a, a); }
  static mask mand(mask a, mask b) { return _mm_and_pd(a, b); }
  static mask mor(mask a, mask b) { return _mm_or_pd(a, b); }
  static mask mandnot(mask a, mask b) { return _mm_andnot_pd(a, b); }
  static reg select(mask m, reg a, reg b) {
    return _mm_or_pd(_mm_and_pd(m, a), _mm_andnot_pd(m, b));
  }
  static double hsum(reg v) { return _mm_cvtsd_f64(_mm_add_sd(v, _mm_unpackhi_pd(v, v))); }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    even = _mm_unpacklo_pd(lo, hi);
    odd = _mm_unpackhi_pd(lo, hi);
  }
  static void unzip(reg lo, reg hi, reg& even, reg& odd) { deinterleave(lo, hi, even, odd); }
  static void interleave(reg even, reg odd, reg& lo, reg& hi) {
    lo = _mm_unpacklo_pd(even, odd);
    hi = _mm_unpackhi_pd(even, odd);
  }
};

#else  // portable scalar fallback (non-x86 builds)

template <typename T>
struct ScalarVec {
  using reg = T;
  using mask = bool;
  static constexpr int L = 1;
  static reg zero() { return T(0); }
  static reg set1(T x) { return x; }
  static reg loadu(const T* p) { return *p; }
  static void storeu(T* p, reg v) { *p = v; }
  static reg loadp(const T* p, int64_t n) { return n > 0 ? *p : T(0); }
  static void storep(T* p, reg v, int64_t n) {
    if (n > 0) *p = v;
  }
  static reg add(reg a, reg b) { return a + b; }
  static reg sub(reg a, reg b) { return a - b; }
  static reg mul(reg a, reg b) { return a * b; }
  static reg div(reg a, reg b) { return a / b; }
  static reg fma(reg a, reg b, reg c) { return a * b + c; }
  // Same NaN behaviour as x86 max: the second operand when unordered.
  static reg max(reg a, reg b) { return a > b ? a : b; }
  static mask gt(reg a, reg b) { return a > b; }
  static mask isnan(reg a) { return a != a; }
  static mask mand(mask a, mask b) { return a && b; }
  static mask mor(mask a, mask b) { return a || b; }
  static mask mandnot(mask a, mask b) { return !a && b; }
  static reg select(mask m, reg a, reg b) { return m ? a : b; }
  static T hsum(reg v) { return v; }
  static void deinterleave(reg lo, reg hi, reg& even, reg& odd) {
    even = lo;
    odd = hi;
  }
  static void unzip(reg lo, reg hi, reg& even, reg& odd) { deinterleave(lo, hi, even, odd); }
  static void interleave(reg even, reg odd, reg& lo, reg& hi) {
    lo = even;
    hi = odd;
  }
};
template <>
struct Vec<float> : ScalarVec<float> {};
template <>
struct Vec<double> : ScalarVec<double> {};

#endif

// max(a, b) that returns NaN when either is NaN (x86 max returns b then).
template <typename T>
inline typename Vec<T>::reg max_nan(typename Vec<T>::reg a, typename Vec<T>::reg b) {
  using V = Vec<T>;
  return V::select(V::isnan(a), a, V::max(a, b));
}

}  // namespace simd
}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
