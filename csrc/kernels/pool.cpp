// max_pool2d and avg_pool2d, forward and backward, for one ISA build.
//
// Work is split over (n, c) planes. Three kinds of loops:
//
// * 2x2 stride-2 unpadded pooling (the MNIST case) has fused fast paths: two
//   input rows are loaded as vectors, reduced vertically, and even/odd columns
//   are split with a lane permute; the backward pass merges the four
//   per-window gradients back with the inverse permute. One pass over memory.
// * Other forward pools are separable: each output row first reduces its
//   window's input rows into a padded row buffer (vectorized), then reduces
//   horizontally along the buffer, vectorized for column stride 1 and 2.
//   Max is order-independent as a value (NaN propagates either way), so the
//   result is exactly the window max.
// * Other backward passes: max recomputes each window's winner (torch's rule:
//   scanning in row-major window order, a cell wins when it is greater than
//   the running max or is NaN -- the first maximum, or the last NaN; padded
//   cells never win) and scatters; avg spreads grad/divisor over the window's
//   real cells, rows at a time.
// * max_pool2d with indices scans each window the same way (one output at a
//   time; it is not on the training path).
#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "fastnn/parallel.h"
#include "kernels/ops.h"
#include "kernels/simd.h"

namespace fastnn {
namespace FASTNN_ISA_NS {

namespace {

using simd::Vec;
using simd::max_nan;

// Plane elements per parallel chunk, so tiny planes are batched together.
constexpr int64_t kGrainElems = int64_t(1) << 14;

template <typename F>
void for_planes(const Pool2dParams& p, int64_t plane_elems, const F& fn) {
  const int64_t planes = p.N * p.C;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / std::max<int64_t>(1, plane_elems));
  parallel_for(planes, grain, [&](int64_t b, int64_t e) { fn(b, e); });
}

// Taps i in [lo, hi) of a window starting at `start` (step d, k taps) whose
// cells start + i*d lie in [0, size).
inline void window_taps(int64_t start, int64_t k, int64_t d, int64_t size, int64_t& lo,
                        int64_t& hi) {
  lo = start >= 0 ? 0 : (-start + d - 1) / d;
  const int64_t last = size - 1 - start;
  hi = last < 0 ? 0 : std::min(k, last / d + 1);
  if (hi < lo) hi = lo;
}

template <typename T>
void fill(T* dst, int64_t n, T v) {
  for (int64_t i = 0; i < n; ++i) dst[i] = v;
}

// Loads 2*m consecutive elements (m <= L outputs) as (lo, hi) vectors, zero
// beyond; m == L takes two plain loads.
template <typename T>
inline void load_pair(const T* src, int64_t m, typename Vec<T>::reg& lo,
                      typename Vec<T>::reg& hi) {
  using V = Vec<T>;
  if (m == V::L) {
    lo = V::loadu(src);
    hi = V::loadu(src + V::L);
  } else {
    const int64_t n = 2 * m;
    lo = V::loadp(src, std::min<int64_t>(n, V::L));
    hi = V::loadp(src + V::L, std::max<int64_t>(0, n - V::L));
  }
}

template <typename T>
inline void store_pair(T* dst, int64_t m, typename Vec<T>::reg lo, typename Vec<T>::reg hi) {
  using V = Vec<T>;
  if (m == V::L) {
    V::storeu(dst, lo);
    V::storeu(dst + V::L, hi);
  } else {
    const int64_t n = 2 * m;
    V::storep(dst, lo, std::min<int64_t>(n, V::L));
    V::storep(dst + V::L, hi, std::max<int64_t>(0, n - V::L));
  }
}

// --- horizontal window reduction along a padded row buffer -------------------
// out[o] = reduce_j buf[o*s + j*d] for j < k. buf must hold readable slack
// (2*L*s elements past the last used one) so full vector loads are safe.
template <typename T, bool kMax>
void reduce_cols(const T* buf, int64_t n_out, int64_t k, int64_t s, int64_t d, T* out) {
  using V = Vec<T>;
  using R = typename V::reg;
  auto op = [](R a, R b) { return kMax ? max_nan<T>(a, b) : V::add(a, b); };
  int64_t o = 0;
  if (s == 1) {
    for (; o < n_out; o += V::L) {
      R acc = V::loadu(buf + o);
      for (int64_t j = 1; j < k; ++j) acc = op(acc, V::loadu(buf + o + j * d));
      V::storep(out + o, acc, std::min<int64_t>(V::L, n_out - o));
    }
  } else if (s == 2) {
    for (; o < n_out; o += V::L) {
      R acc = V::zero();
      for (int64_t j = 0; j < k; ++j) {
        R e, odd;
        V::deinterleave(V::loadu(buf + 2 * o + j * d), V::loadu(buf + 2 * o + j * d + V::L), e,
                        odd);
        acc = j == 0 ? e : op(acc, e);
      }
      V::storep(out + o, acc, std::min<int64_t>(V::L, n_out - o));
    }
  } else {
    for (; o < n_out; ++o) {
      const T* w = buf + o * s;
      T acc = w[0];
      for (int64_t j = 1; j < k; ++j) {
        const T v = w[j * d];
        if (kMax) {
          acc = (acc != acc) ? acc : ((v > acc || v != v) ? v : acc);
        } else {
          acc += v;
        }
      }
      out[o] = acc;
    }
  }
}

// Row-buffer length: padded input row plus whatever the last (ceil_mode)
// window reaches, plus vector slack.
inline int64_t row_buffer_len(const Pool2dParams& p, int64_t L) {
  const int64_t reach = (p.OW - 1) * p.sw + (p.kw - 1) * p.dw + 1;
  return std::max(p.pw + p.W, reach) + 2 * L * std::max<int64_t>(p.sw, 1) + 2 * L;
}

// --- max pool -------------------------------------------------------------------

template <typename T>
void max_fwd_2x2(const Pool2dParams& p, const T* x, T* y, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  using R = typename V::reg;
  for (int64_t c = c0; c < c1; ++c) {
    const T* xp = x + c * p.H * p.W;
    T* yp = y + c * p.OH * p.OW;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const T* r0 = xp + 2 * oh * p.W;
      const T* r1 = r0 + p.W;
      T* yr = yp + oh * p.OW;
      for (int64_t o = 0; o < p.OW; o += V::L) {
        const int64_t m = std::min<int64_t>(V::L, p.OW - o);
        R a0, a1, b0, b1, e, od;
        load_pair<T>(r0 + 2 * o, m, a0, a1);
        load_pair<T>(r1 + 2 * o, m, b0, b1);
        V::deinterleave(max_nan<T>(a0, b0), max_nan<T>(a1, b1), e, od);
        V::storep(yr + o, max_nan<T>(e, od), m);
      }
    }
  }
}

template <typename T>
void max_fwd_general(const Pool2dParams& p, const T* x, T* y, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t blen = row_buffer_len(p, V::L);
  Buffer<T> buf(blen);
  T* row = buf.get() + p.pw;  // row[iw] for iw in [-pw, ...)
  fill(buf.get(), blen, ninf);
  for (int64_t c = c0; c < c1; ++c) {
    const T* xp = x + c * p.H * p.W;
    T* yp = y + c * p.OH * p.OW;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const int64_t h0 = oh * p.sh - p.ph;
      int64_t lo, hi;
      window_taps(h0, p.kh, p.dh, p.H, lo, hi);
      T* yr = yp + oh * p.OW;
      if (lo >= hi) {  // no real row: nothing can win
        fill(yr, p.OW, ninf);
        continue;
      }
      const T* first = xp + (h0 + lo * p.dh) * p.W;
      int64_t iw = 0;
      for (; iw + V::L <= p.W; iw += V::L) {
        typename V::reg acc = V::loadu(first + iw);
        for (int64_t i = lo + 1; i < hi; ++i)
          acc = max_nan<T>(acc, V::loadu(xp + (h0 + i * p.dh) * p.W + iw));
        V::storeu(row + iw, acc);
      }
      if (iw < p.W) {
        const int64_t m = p.W - iw;
        typename V::reg acc = V::loadp(first + iw, m);
        for (int64_t i = lo + 1; i < hi; ++i)
          acc = max_nan<T>(acc, V::loadp(xp + (h0 + i * p.dh) * p.W + iw, m));
        V::storep(row + iw, acc, m);
      }
      reduce_cols<T, true>(buf.get(), p.OW, p.kw, p.sw, p.dw, yr);
    }
  }
}

template <typename T>
void max_bwd_2x2(const Pool2dParams& p, const T* gy, const T* x, T* gx, int64_t c0,
                 int64_t c1) {
  using V = Vec<T>;
  using R = typename V::reg;
  const R zero = V::zero();
  // In window order a, b, c, d a cell replaces the running max when greater or
  // NaN: the first maximum wins, or the last NaN.
  auto beats = [](R v, R m) { return V::mor(V::gt(v, m), V::isnan(v)); };
  for (int64_t ch = c0; ch < c1; ++ch) {
    const T* xp = x + ch * p.H * p.W;
    const T* gp = gy + ch * p.OH * p.OW;
    T* gxp = gx + ch * p.H * p.W;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const T* r0 = xp + 2 * oh * p.W;
      const T* r1 = r0 + p.W;
      T* g0 = gxp + 2 * oh * p.W;
      T* g1 = g0 + p.W;
      const T* gr = gp + oh * p.OW;
      for (int64_t o = 0; o < p.OW; o += V::L) {
        const int64_t m = std::min<int64_t>(V::L, p.OW - o);
        R a0, a1, b0, b1, a, b, c, d;
        load_pair<T>(r0 + 2 * o, m, a0, a1);
        load_pair<T>(r1 + 2 * o, m, b0, b1);
        V::deinterleave(a0, a1, a, b);
        V::deinterleave(b0, b1, c, d);
        R mx = a;
        const auto ub = beats(b, mx);
        mx = V::select(ub, b, mx);
        const auto uc = beats(c, mx);
        mx = V::select(uc, c, mx);
        const auto ud = beats(d, mx);
        R g = m == V::L ? V::loadu(gr + o) : V::loadp(gr + o, m);
        const R gd = V::select(ud, g, zero);
        g = V::select(ud, zero, g);
        const R gc = V::select(uc, g, zero);
        g = V::select(uc, zero, g);
        const R gb = V::select(ub, g, zero);
        const R ga = V::select(ub, zero, g);
        R lo, hi;
        V::interleave(ga, gb, lo, hi);
        store_pair<T>(g0 + 2 * o, m, lo, hi);
        V::interleave(gc, gd, lo, hi);
        store_pair<T>(g1 + 2 * o, m, lo, hi);
      }
      for (int64_t w = 2 * p.OW; w < p.W; ++w) g0[w] = g1[w] = T(0);
    }
    for (int64_t h = 2 * p.OH; h < p.H; ++h) fill(gxp + h * p.W, p.W, T(0));
  }
}

// (max, flat index in the plane) of the window at (h0, w0) with real taps
// [ilo, ihi) x [jlo, jhi): a cell wins when it is greater than the running max
// (which starts at -inf) or is NaN, so the first maximum wins, or the last NaN
// (torch's rule). A window with no real cell gives -inf and the index of its
// first tap at or after the plane's top-left corner (torch's value).
template <typename T>
inline std::pair<T, int64_t> window_winner(const Pool2dParams& p, const T* xp, int64_t h0,
                                           int64_t w0, int64_t ilo, int64_t ihi, int64_t jlo,
                                           int64_t jhi) {
  int64_t best = (h0 + ilo * p.dh) * p.W + (w0 + jlo * p.dw);
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t i = ilo; i < ihi; ++i) {
    const int64_t row = (h0 + i * p.dh) * p.W + w0;
    for (int64_t j = jlo; j < jhi; ++j) {
      const T v = xp[row + j * p.dw];
      if (v > m || v != v) {
        m = v;
        best = row + j * p.dw;
      }
    }
  }
  return {m, best};
}

template <typename T>
void max_with_indices(const Pool2dParams& p, const T* x, T* y, int64_t* ind, int64_t c0,
                      int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const T* xp = x + c * p.H * p.W;
    T* yp = y + c * p.OH * p.OW;
    int64_t* ip = ind + c * p.OH * p.OW;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const int64_t h0 = oh * p.sh - p.ph;
      int64_t ilo, ihi;
      window_taps(h0, p.kh, p.dh, p.H, ilo, ihi);
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        const int64_t w0 = ow * p.sw - p.pw;
        int64_t jlo, jhi;
        window_taps(w0, p.kw, p.dw, p.W, jlo, jhi);
        const std::pair<T, int64_t> win = window_winner(p, xp, h0, w0, ilo, ihi, jlo, jhi);
        yp[oh * p.OW + ow] = win.first;
        ip[oh * p.OW + ow] = win.second;
      }
    }
  }
}

template <typename T>
void max_bwd_general(const Pool2dParams& p, const T* gy, const T* x, T* gx, int64_t c0,
                     int64_t c1) {
  for (int64_t c = c0; c < c1; ++c) {
    const T* xp = x + c * p.H * p.W;
    const T* gp = gy + c * p.OH * p.OW;
    T* gxp = gx + c * p.H * p.W;
    fill(gxp, p.H * p.W, T(0));
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const int64_t h0 = oh * p.sh - p.ph;
      int64_t ilo, ihi;
      window_taps(h0, p.kh, p.dh, p.H, ilo, ihi);
      if (ilo >= ihi) continue;
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        const int64_t w0 = ow * p.sw - p.pw;
        int64_t jlo, jhi;
        window_taps(w0, p.kw, p.dw, p.W, jlo, jhi);
        if (jlo >= jhi) continue;
        const int64_t best = window_winner(p, xp, h0, w0, ilo, ihi, jlo, jhi).second;
        gxp[best] += gp[oh * p.OW + ow];
      }
    }
  }
}

// --- avg pool -------------------------------------------------------------------

// Divisor pieces along one axis for output o: count of cells in the window
// clipped to the padded input (count_include_pad) and of real cells.
inline void avg_counts(int64_t o, int64_t k, int64_t s, int64_t pad, int64_t size,
                       int64_t& padded, int64_t& real) {
  const int64_t start = o * s - pad;
  const int64_t end = std::min(start + k, size + pad);
  padded = end - start;
  real = std::max<int64_t>(0, std::min(end, size) - std::max<int64_t>(start, 0));
}

// divisors[ow] for output row oh; 1 where the window has no real cell (its sum
// is 0 and torch outputs 0).
template <typename T>
void avg_divisor_row(const Pool2dParams& p, int64_t oh, T* div) {
  int64_t hp, hr;
  avg_counts(oh, p.kh, p.sh, p.ph, p.H, hp, hr);
  for (int64_t ow = 0; ow < p.OW; ++ow) {
    int64_t wp, wr;
    avg_counts(ow, p.kw, p.sw, p.pw, p.W, wp, wr);
    int64_t d;
    if (hr * wr == 0) {
      d = 1;
    } else if (p.divisor_override != 0) {
      d = p.divisor_override;
    } else {
      d = p.count_include_pad ? hp * wp : hr * wr;
    }
    div[ow] = static_cast<T>(d);
  }
}

template <typename T>
void avg_fwd_2x2(const Pool2dParams& p, const T* x, T* y, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  using R = typename V::reg;
  const R div = V::set1(static_cast<T>(p.divisor_override != 0 ? p.divisor_override : 4));
  for (int64_t c = c0; c < c1; ++c) {
    const T* xp = x + c * p.H * p.W;
    T* yp = y + c * p.OH * p.OW;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const T* r0 = xp + 2 * oh * p.W;
      const T* r1 = r0 + p.W;
      T* yr = yp + oh * p.OW;
      for (int64_t o = 0; o < p.OW; o += V::L) {
        const int64_t m = std::min<int64_t>(V::L, p.OW - o);
        R a0, a1, b0, b1, e, od;
        load_pair<T>(r0 + 2 * o, m, a0, a1);
        load_pair<T>(r1 + 2 * o, m, b0, b1);
        // Window order: (x00 + x01) + (x10 + x11).
        V::deinterleave(a0, a1, e, od);
        const R top = V::add(e, od);
        V::deinterleave(b0, b1, e, od);
        V::storep(yr + o, V::div(V::add(top, V::add(e, od)), div), m);
      }
    }
  }
}

template <typename T>
void avg_fwd_general(const Pool2dParams& p, const T* x, T* y, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  const int64_t blen = row_buffer_len(p, V::L);
  Buffer<T> buf(blen), div(p.OW + V::L), sums(p.OW + V::L);
  T* row = buf.get() + p.pw;
  fill(buf.get(), blen, T(0));
  for (int64_t c = c0; c < c1; ++c) {
    const T* xp = x + c * p.H * p.W;
    T* yp = y + c * p.OH * p.OW;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const int64_t h0 = oh * p.sh - p.ph;
      const int64_t hs = std::max<int64_t>(h0, 0), he = std::min(h0 + p.kh, p.H);
      T* yr = yp + oh * p.OW;
      if (hs >= he) {
        fill(yr, p.OW, T(0));
        continue;
      }
      int64_t iw = 0;
      for (; iw < p.W; iw += V::L) {
        const int64_t m = std::min<int64_t>(V::L, p.W - iw);
        typename V::reg acc = V::loadp(xp + hs * p.W + iw, m);
        for (int64_t ih = hs + 1; ih < he; ++ih) acc = V::add(acc, V::loadp(xp + ih * p.W + iw, m));
        V::storep(row + iw, acc, m);
      }
      reduce_cols<T, false>(buf.get(), p.OW, p.kw, p.sw, 1, sums.get());
      avg_divisor_row(p, oh, div.get());
      for (int64_t o = 0; o < p.OW; o += V::L) {
        const int64_t m = std::min<int64_t>(V::L, p.OW - o);
        V::storep(yr + o, V::div(V::loadp(sums.get() + o, m), V::loadp(div.get() + o, m)), m);
      }
    }
  }
}

template <typename T>
void avg_bwd_2x2(const Pool2dParams& p, const T* gy, T* gx, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  using R = typename V::reg;
  const R div = V::set1(static_cast<T>(p.divisor_override != 0 ? p.divisor_override : 4));
  for (int64_t c = c0; c < c1; ++c) {
    const T* gp = gy + c * p.OH * p.OW;
    T* gxp = gx + c * p.H * p.W;
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      T* g0 = gxp + 2 * oh * p.W;
      T* g1 = g0 + p.W;
      const T* gr = gp + oh * p.OW;
      for (int64_t o = 0; o < p.OW; o += V::L) {
        const int64_t m = std::min<int64_t>(V::L, p.OW - o);
        const R g = V::div(m == V::L ? V::loadu(gr + o) : V::loadp(gr + o, m), div);
        R lo, hi;
        V::interleave(g, g, lo, hi);
        store_pair<T>(g0 + 2 * o, m, lo, hi);
        store_pair<T>(g1 + 2 * o, m, lo, hi);
      }
      for (int64_t w = 2 * p.OW; w < p.W; ++w) g0[w] = g1[w] = T(0);
    }
    for (int64_t h = 2 * p.OH; h < p.H; ++h) fill(gxp + h * p.W, p.W, T(0));
  }
}

template <typename T>
void avg_bwd_general(const Pool2dParams& p, const T* gy, T* gx, int64_t c0, int64_t c1) {
  using V = Vec<T>;
  const int64_t blen = row_buffer_len(p, V::L);
  Buffer<T> buf(blen), div(p.OW + V::L), share(p.OW + V::L);
  T* row = buf.get() + p.pw;
  for (int64_t c = c0; c < c1; ++c) {
    const T* gp = gy + c * p.OH * p.OW;
    T* gxp = gx + c * p.H * p.W;
    fill(gxp, p.H * p.W, T(0));
    for (int64_t oh = 0; oh < p.OH; ++oh) {
      const int64_t h0 = oh * p.sh - p.ph;
      const int64_t hs = std::max<int64_t>(h0, 0), he = std::min(h0 + p.kh, p.H);
      if (hs >= he) continue;
      avg_divisor_row(p, oh, div.get());
      const T* gr = gp + oh * p.OW;
      for (int64_t ow = 0; ow < p.OW; ++ow) share.get()[ow] = gr[ow] / div.get()[ow];
      // Spread each window's share along the padded row buffer, then add the
      // real part of that row to every input row of the window.
      fill(buf.get(), blen, T(0));
      for (int64_t ow = 0; ow < p.OW; ++ow) {
        T* w = buf.get() + ow * p.sw;
        const T s = share.get()[ow];
        for (int64_t j = 0; j < p.kw; ++j) w[j] += s;
      }
      for (int64_t ih = hs; ih < he; ++ih) {
        T* dst = gxp + ih * p.W;
        for (int64_t iw = 0; iw < p.W; iw += V::L) {
          const int64_t m = std::min<int64_t>(V::L, p.W - iw);
          V::storep(dst + iw, V::add(V::loadp(dst + iw, m), V::loadp(row + iw, m)), m);
        }
      }
    }
  }
}

}  // namespace

template <typename T>
void max_pool2d_forward(const Pool2dParams& p, const T* x, T* y) {
  if (p.N * p.C * p.OH * p.OW == 0) return;
  const bool fast = is_2x2_s2(p);
  for_planes(p, p.H * p.W, [&](int64_t c0, int64_t c1) {
    if (fast) {
      max_fwd_2x2(p, x, y, c0, c1);
    } else {
      max_fwd_general(p, x, y, c0, c1);
    }
  });
}

template <typename T>
void max_pool2d_backward(const Pool2dParams& p, const T* gy, const T* x, T* gx) {
  if (p.N * p.C * p.H * p.W == 0) return;
  const bool fast = is_2x2_s2(p);
  for_planes(p, p.H * p.W, [&](int64_t c0, int64_t c1) {
    if (fast) {
      max_bwd_2x2(p, gy, x, gx, c0, c1);
    } else {
      max_bwd_general(p, gy, x, gx, c0, c1);
    }
  });
}

template <typename T>
void max_pool2d_with_indices_forward(const Pool2dParams& p, const T* x, T* y, int64_t* ind) {
  if (p.N * p.C * p.OH * p.OW == 0) return;
  for_planes(p, p.H * p.W,
             [&](int64_t c0, int64_t c1) { max_with_indices(p, x, y, ind, c0, c1); });
}

template <typename T>
void avg_pool2d_forward(const Pool2dParams& p, const T* x, T* y) {
  if (p.N * p.C * p.OH * p.OW == 0) return;
  const bool fast = is_2x2_s2(p);
  for_planes(p, p.H * p.W, [&](int64_t c0, int64_t c1) {
    if (fast) {
      avg_fwd_2x2(p, x, y, c0, c1);
    } else {
      avg_fwd_general(p, x, y, c0, c1);
    }
  });
}

template <typename T>
void avg_pool2d_backward(const Pool2dParams& p, const T* gy, T* gx) {
  if (p.N * p.C * p.H * p.W == 0) return;
  const bool fast = is_2x2_s2(p);
  for_planes(p, p.H * p.W, [&](int64_t c0, int64_t c1) {
    if (fast) {
      avg_bwd_2x2(p, gy, gx, c0, c1);
    } else {
      avg_bwd_general(p, gy, gx, c0, c1);
    }
  });
}

#define FASTNN_INSTANTIATE(T)                                                              \
  template void max_pool2d_forward<T>(const Pool2dParams&, const T*, T*);                  \
  template void max_pool2d_backward<T>(const Pool2dParams&, const T*, const T*, T*);       \
  template void max_pool2d_with_indices_forward<T>(const Pool2dParams&, const T*, T*,      \
                                                   int64_t*);                              \
  template void avg_pool2d_forward<T>(const Pool2dParams&, const T*, T*);                  \
  template void avg_pool2d_backward<T>(const Pool2dParams&, const T*, T*);
FASTNN_INSTANTIATE(float)
FASTNN_INSTANTIATE(double)
#undef FASTNN_INSTANTIATE

}  // namespace FASTNN_ISA_NS
}  // namespace fastnn
