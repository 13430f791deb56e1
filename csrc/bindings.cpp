// Python bindings of the C++ kernels: module fastnn._C.
//
// The only file that includes pybind11. Every function takes NumPy arrays and
// checks them strictly before touching memory: ndarray type, ndim, shape,
// dtype (float32/float64, one dtype per call; labels int64), C-contiguity and,
// for in-place ops, writeability and non-overlap. Nothing is converted, copied
// or downcast silently: a wrong argument raises TypeError/ValueError naming the
// function and the argument. Outputs are freshly allocated C-contiguous arrays
// (never aliases of inputs). The GIL is released while a kernel runs.
//
// ISA choice: the best ISA the CPU supports is active at import. The
// environment variable FASTNN_ISA=baseline|avx2|avx512 forces one; an unknown
// name or an ISA this CPU/OS cannot run falls back to the best available and
// leaves the reason in _C._isa_warning (a str, else None), which
// fastnn.backends.cpu turns into a RuntimeWarning. select_isa() switches at
// run time (tests use it to cover every ISA).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <utility>
#include <sstream>
#include <string>
#include <vector>

#include "fastnn/cpuinfo.h"
#include "fastnn/kernels.h"
#include "fastnn/memory_pool.h"
#include "fastnn/parallel.h"

#ifndef FASTNN_VERSION
#define FASTNN_VERSION "0.0.0+dev"
#endif

namespace py = pybind11;
using fastnn::Conv2dParams;
using fastnn::KernelTable;
using fastnn::Pool2dParams;
using Pair = std::array<int64_t, 2>;

namespace {

// --- argument checking ---------------------------------------------------------

enum class DType { f32, f64 };

std::string shape_str(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) {
    if (i) s << ", ";
    s << a.shape(i);
  }
  if (a.ndim() == 1) s << ",";
  s << ")";
  return s.str();
}

std::string dtype_str(const py::array& a) { return py::str(a.dtype()).cast<std::string>(); }

bool native_order(const py::dtype& dt) {
  const char b = dt.byteorder();
  return b == '=' || b == '|' ||
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
         b == '<';
#else
         b == '>';
#endif
}

// The argument as an ndarray, or TypeError. No conversion of lists etc.
py::array as_array(const char* op, const char* name, const py::handle& obj) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(op) + ": " + name + " must be a numpy.ndarray, got " +
                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  return py::reinterpret_borrow<py::array>(obj);
}

void check_contiguous(const char* op, const char* name, const py::array& a) {
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(op) + ": " + name +
                          " must be C-contiguous (use numpy.ascontiguousarray)");
  }
}

DType float_dtype(const char* op, const char* name, const py::array& a) {
  const py::dtype dt = a.dtype();
  if (dt.kind() == 'f' && native_order(dt)) {
    if (dt.itemsize() == 4) return DType::f32;
    if (dt.itemsize() == 8) return DType::f64;
  }
  throw py::type_error(std::string(op) + ": " + name + " must be float32 or float64, got " +
                       dtype_str(a));
}

// A C-contiguous float array with `ndim` dims (ndim < 0: any).
py::array float_arg(const char* op, const char* name, const py::handle& obj, int ndim,
                    const char* layout) {
  py::array a = as_array(op, name, obj);
  float_dtype(op, name, a);
  if (ndim >= 0 && a.ndim() != ndim) {
    throw py::value_error(std::string(op) + ": " + name + " must be " + std::to_string(ndim) +
                          "-D " + layout + ", got shape " + shape_str(a));
  }
  check_contiguous(op, name, a);
  return a;
}

void same_dtype(const char* op, const py::array& ref, const char* ref_name, const py::array& a,
                const char* name) {
  if (float_dtype(op, name, a) != float_dtype(op, ref_name, ref)) {
    throw py::type_error(std::string(op) + ": " + name + " has dtype " + dtype_str(a) +
                         " but " + ref_name + " has dtype " + dtype_str(ref) +
                         " (all arrays must share one dtype)");
  }
}

void same_shape(const char* op, const py::array& ref, const char* ref_name, const py::array& a,
                const char* name) {
  bool same = a.ndim() == ref.ndim();
  for (py::ssize_t i = 0; same && i < a.ndim(); ++i) same = a.shape(i) == ref.shape(i);
  if (!same) {
    throw py::value_error(std::string(op) + ": " + name + " must have the shape of " +
                          ref_name + " " + shape_str(ref) + ", got " + shape_str(a));
  }
}

void check_writeable(const char* op, const char* name, const py::array& a) {
  if (!a.writeable()) {
    throw py::value_error(std::string(op) + ": " + name + " must be writeable (updated in place)");
  }
}

bool overlaps(const py::array& a, const py::array& b) {
  const auto* pa = static_cast<const char*>(a.data());
  const auto* pb = static_cast<const char*>(b.data());
  return a.nbytes() > 0 && b.nbytes() > 0 && pa < pb + b.nbytes() && pb < pa + a.nbytes();
}

void no_overlap(const char* op, const py::array& a, const char* an, const py::array& b,
                const char* bn) {
  if (overlaps(a, b)) {
    throw py::value_error(std::string(op) + ": " + an + " and " + bn + " must not share memory");
  }
}

// Geometry beyond 2^31 is never meaningful, and bounding it keeps every derived
// size (size + 2*p - d*(k-1)) far from int64 overflow.
constexpr int64_t kMaxGeometry = (int64_t(1) << 31) - 1;

void check_pair(const char* op, const char* name, const Pair& v, int64_t min) {
  if (v[0] > kMaxGeometry || v[1] > kMaxGeometry) {
    throw py::value_error(std::string(op) + ": " + name + " must be < 2**31, got (" +
                          std::to_string(v[0]) + ", " + std::to_string(v[1]) + ")");
  }
  if (v[0] < min || v[1] < min) {
    throw py::value_error(std::string(op) + ": " + name + " must be >= " + std::to_string(min) +
                          ", got (" + std::to_string(v[0]) + ", " + std::to_string(v[1]) + ")");
  }
}

std::string pair_str(int64_t a, int64_t b) {
  return "(" + std::to_string(a) + ", " + std::to_string(b) + ")";
}

template <typename T>
const KernelTable<T>& table();
template <>
const KernelTable<float>& table<float>() { return fastnn::table_f32(); }
template <>
const KernelTable<double>& table<double>() { return fastnn::table_f64(); }

// Calls f(T{}) with T the C++ type of the dtype.
template <typename F>
auto with_dtype(DType dt, F&& f) {
  if (dt == DType::f32) return f(float{});
  return f(double{});
}

template <typename T>
T* ptr(py::array& a) {
  return static_cast<T*>(a.mutable_data());
}
template <typename T>
const T* cptr(const py::array& a) {
  return static_cast<const T*>(a.data());
}

// --- output memory: NumPy's allocator interface -----------------------------------
//
// Large outputs get their memory from fastnn::pool (fastnn/memory_pool.h: a
// training step's activations come back with their pages mapped; with its
// limit at 0 NumPy's own allocator serves them, as for small ones) through
// NumPy's allocator interface (NEP 49): while one is created our handler is
// NumPy's current one, so the array is an ordinary array that owns its data,
// and NumPy hands its memory to the handler when it dies. The two structs are
// NumPy's PyDataMemAllocator and PyDataMem_Handler (numpy/ndarraytypes.h,
// ABI-stable since 1.22), declared here so the build needs no NumPy headers.
struct NpyAllocator {
  void* ctx;
  void* (*malloc)(void* ctx, size_t size);
  void* (*calloc)(void* ctx, size_t nelem, size_t elsize);
  void* (*realloc)(void* ctx, void* ptr, size_t new_size);
  void (*free)(void* ctx, void* ptr, size_t size);
};
struct NpyHandler {
  char name[127];
  uint8_t version;
  NpyAllocator allocator;
};

NpyHandler pool_handler = {
    "fastnn_memory_pool",
    1,
    {nullptr,
     [](void*, size_t size) { return fastnn::pool::acquire(size); },
     [](void*, size_t n, size_t elsize) -> void* {
       size_t bytes = 0;
       return __builtin_mul_overflow(n, elsize, &bytes) ? nullptr : fastnn::pool::acquire_zeroed(bytes);
     },
     [](void*, void* p, size_t size) { return fastnn::pool::resize(p, size); },
     [](void*, void* p, size_t) { fastnn::pool::release(p); }}};

// PyDataMem_SetHandler from NumPy's C-API table (entry 304 of _ARRAY_API, as
// numpy/__multiarray_api.h defines it; pybind11 reaches the table the same
// way), or nullptr where NumPy is older than 1.22: outputs then use NumPy's
// own allocator.
using SetHandlerFn = PyObject* (*)(PyObject*);
SetHandlerFn numpy_set_handler = nullptr;
PyObject* pool_capsule = nullptr;

void init_output_allocator() {
  py::module_ np = py::module_::import("numpy");
  const std::string version = py::str(np.attr("__version__"));
  int major = 0, minor = 0;
  if (std::sscanf(version.c_str(), "%d.%d", &major, &minor) != 2 || (major == 1 && minor < 22)) return;
  py::module_ mu = py::module_::import(major >= 2 ? "numpy._core.multiarray" : "numpy.core.multiarray");
  py::object table = mu.attr("_ARRAY_API");
  void** api = static_cast<void**>(PyCapsule_GetPointer(table.ptr(), nullptr));
  if (!api) throw py::error_already_set();
  pool_capsule = PyCapsule_New(&pool_handler, "mem_handler", nullptr);  // lives as long as the process
  if (!pool_capsule) throw py::error_already_set();
  numpy_set_handler = reinterpret_cast<SetHandlerFn>(api[304]);
}

// Makes the pool NumPy's allocator for this thread's context while alive.
class PoolAllocatorScope {
 public:
  PoolAllocatorScope() : old_(numpy_set_handler ? numpy_set_handler(pool_capsule) : nullptr) {
    if (numpy_set_handler && !old_) PyErr_Clear();  // not switched: NumPy's own allocator serves
  }
  ~PoolAllocatorScope() {
    if (!old_) return;
    PyObject* ours = numpy_set_handler(old_);
    if (ours) {
      Py_DECREF(ours);
    } else {
      PyErr_Clear();
    }
    Py_DECREF(old_);
  }
  PoolAllocatorScope(const PoolAllocatorScope&) = delete;
  PoolAllocatorScope& operator=(const PoolAllocatorScope&) = delete;

 private:
  PyObject* old_;
};

template <typename T>
py::array new_array(const std::vector<py::ssize_t>& shape) {
  // An output whose byte count overflows cannot be allocated: MemoryError
  // (pybind11 maps std::bad_alloc) rather than a wrapped-around size.
  py::ssize_t bytes = sizeof(T);
  for (py::ssize_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(bytes, d, &bytes)) throw std::bad_alloc();
  }
  if (static_cast<size_t>(bytes) >= fastnn::pool::kMinBytes && fastnn::pool::limit() > 0) {
    PoolAllocatorScope scope;
    return py::array_t<T, py::array::c_style>(shape);
  }
  return py::array_t<T, py::array::c_style>(shape);
}

// --- conv2d ----------------------------------------------------------------------

int64_t conv_out(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d) {
  const int64_t span = size + 2 * p - d * (k - 1) - 1;
  return span < 0 ? 0 : span / s + 1;
}

void check_conv_geometry(const char* op, const Pair& stride, const Pair& padding,
                         const Pair& dilation, int64_t groups) {
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  if (groups < 1) {
    throw py::value_error(std::string(op) + ": groups must be >= 1, got " +
                          std::to_string(groups));
  }
}

Conv2dParams conv_params(const char* op, int64_t N, int64_t C, int64_t H, int64_t W, int64_t O,
                         int64_t Cg, int64_t KH, int64_t KW, const Pair& stride,
                         const Pair& padding, const Pair& dilation, int64_t groups) {
  if (C % groups != 0 || O % groups != 0) {
    throw py::value_error(std::string(op) + ": groups=" + std::to_string(groups) +
                          " must divide the input channels (" + std::to_string(C) +
                          ") and the output channels (" + std::to_string(O) + ")");
  }
  if (Cg != C / groups) {
    throw py::value_error(std::string(op) + ": weight must have C/groups = " +
                          std::to_string(C / groups) + " input channels, got " +
                          std::to_string(Cg));
  }
  if (KH < 1 || KW < 1) {
    throw py::value_error(std::string(op) + ": kernel size must be >= 1, got " +
                          pair_str(KH, KW));
  }
  Conv2dParams p{};
  p.N = N, p.C = C, p.H = H, p.W = W, p.O = O, p.KH = KH, p.KW = KW;
  p.sh = stride[0], p.sw = stride[1], p.ph = padding[0], p.pw = padding[1];
  p.dh = dilation[0], p.dw = dilation[1], p.groups = groups;
  p.OH = conv_out(H, KH, p.sh, p.ph, p.dh);
  p.OW = conv_out(W, KW, p.sw, p.pw, p.dw);
  if (p.OH < 1 || p.OW < 1) {
    throw py::value_error(std::string(op) + ": input " + pair_str(H, W) + " with padding " +
                          pair_str(p.ph, p.pw) + " is smaller than the dilated kernel " +
                          pair_str(p.dh * (KH - 1) + 1, p.dw * (KW - 1) + 1));
  }
  return p;
}

py::array conv2d(const py::handle& x_obj, const py::handle& w_obj, const py::handle& b_obj,
                 const Pair& stride, const Pair& padding, const Pair& dilation, int64_t groups) {
  const char* op = "conv2d";
  py::array x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  py::array w = float_arg(op, "weight", w_obj, 4, "(O, C/groups, KH, KW)");
  same_dtype(op, x, "x", w, "weight");
  std::optional<py::array> b;
  if (!b_obj.is_none()) {
    b = float_arg(op, "bias", b_obj, 1, "(O,)");
    same_dtype(op, x, "x", *b, "bias");
    if (b->shape(0) != w.shape(0)) {
      throw py::value_error(std::string(op) + ": bias must have shape (" +
                            std::to_string(w.shape(0)) + ",), got " + shape_str(*b));
    }
  }
  check_conv_geometry(op, stride, padding, dilation, groups);
  const Conv2dParams p = conv_params(op, x.shape(0), x.shape(1), x.shape(2), x.shape(3),
                                     w.shape(0), w.shape(1), w.shape(2), w.shape(3), stride,
                                     padding, dilation, groups);
  return with_dtype(float_dtype(op, "x", x), [&](auto tag) {
    using T = decltype(tag);
    py::array y = new_array<T>({p.N, p.O, p.OH, p.OW});
    const T* bp = b ? cptr<T>(*b) : nullptr;
    T* yp = ptr<T>(y);
    {
      py::gil_scoped_release release;
      table<T>().conv2d_forward(p, cptr<T>(x), cptr<T>(w), bp, yp);
    }
    return y;
  });
}

void check_grad_hw(const char* op, const py::array& gy, const Conv2dParams& p) {
  if (gy.shape(2) != p.OH || gy.shape(3) != p.OW) {
    throw py::value_error(std::string(op) + ": grad_out must have spatial size " +
                          pair_str(p.OH, p.OW) + " for this geometry, got " + shape_str(gy));
  }
}

py::array conv2d_backward_input(const py::handle& gy_obj, const py::handle& w_obj,
                                const Pair& input_hw, const Pair& stride, const Pair& padding,
                                const Pair& dilation, int64_t groups) {
  const char* op = "conv2d_backward_input";
  py::array gy = float_arg(op, "grad_out", gy_obj, 4, "(N, O, OH, OW)");
  py::array w = float_arg(op, "weight", w_obj, 4, "(O, C/groups, KH, KW)");
  same_dtype(op, gy, "grad_out", w, "weight");
  check_conv_geometry(op, stride, padding, dilation, groups);
  check_pair(op, "input_hw", input_hw, 1);
  if (gy.shape(1) != w.shape(0)) {
    throw py::value_error(std::string(op) + ": grad_out has " + std::to_string(gy.shape(1)) +
                          " channels but weight has " + std::to_string(w.shape(0)) +
                          " output channels");
  }
  const int64_t C = w.shape(1) * groups;
  const Conv2dParams p = conv_params(op, gy.shape(0), C, input_hw[0], input_hw[1], w.shape(0),
                                     w.shape(1), w.shape(2), w.shape(3), stride, padding,
                                     dilation, groups);
  check_grad_hw(op, gy, p);
  return with_dtype(float_dtype(op, "grad_out", gy), [&](auto tag) {
    using T = decltype(tag);
    py::array gx = new_array<T>({p.N, p.C, p.H, p.W});
    T* gxp = ptr<T>(gx);
    {
      py::gil_scoped_release release;
      table<T>().conv2d_backward_input(p, cptr<T>(gy), cptr<T>(w), gxp);
    }
    return gx;
  });
}

py::array conv2d_backward_weight(const py::handle& gy_obj, const py::handle& x_obj,
                                 const Pair& kernel_hw, const Pair& stride, const Pair& padding,
                                 const Pair& dilation, int64_t groups) {
  const char* op = "conv2d_backward_weight";
  py::array gy = float_arg(op, "grad_out", gy_obj, 4, "(N, O, OH, OW)");
  py::array x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  same_dtype(op, gy, "grad_out", x, "x");
  check_conv_geometry(op, stride, padding, dilation, groups);
  check_pair(op, "kernel_hw", kernel_hw, 1);
  if (gy.shape(0) != x.shape(0)) {
    throw py::value_error(std::string(op) + ": grad_out has batch " +
                          std::to_string(gy.shape(0)) + " but x has batch " +
                          std::to_string(x.shape(0)));
  }
  const int64_t O = gy.shape(1);
  if (x.shape(1) % groups != 0) {
    throw py::value_error(std::string(op) + ": groups=" + std::to_string(groups) +
                          " must divide the input channels (" + std::to_string(x.shape(1)) +
                          ")");
  }
  const Conv2dParams p = conv_params(op, x.shape(0), x.shape(1), x.shape(2), x.shape(3), O,
                                     x.shape(1) / groups, kernel_hw[0], kernel_hw[1], stride,
                                     padding, dilation, groups);
  check_grad_hw(op, gy, p);
  return with_dtype(float_dtype(op, "x", x), [&](auto tag) {
    using T = decltype(tag);
    py::array gw = new_array<T>({p.O, p.C / p.groups, p.KH, p.KW});
    T* gwp = ptr<T>(gw);
    {
      py::gil_scoped_release release;
      table<T>().conv2d_backward_weight(p, cptr<T>(gy), cptr<T>(x), gwp);
    }
    return gw;
  });
}

// --- matmul ----------------------------------------------------------------------

py::array matmul(const py::handle& a_obj, const py::handle& b_obj, bool trans_a, bool trans_b) {
  const char* op = "matmul";
  py::array a = float_arg(op, "a", a_obj, -1, "");
  py::array b = float_arg(op, "b", b_obj, -1, "");
  same_dtype(op, a, "a", b, "b");
  if ((a.ndim() != 2 && a.ndim() != 3) || b.ndim() != a.ndim()) {
    throw py::value_error(std::string(op) +
                          ": a and b must both be 2-D (M, K) @ (K, N) or both 3-D (B, M, K) "
                          "@ (B, K, N), got shapes " + shape_str(a) + " and " + shape_str(b));
  }
  const bool batched = a.ndim() == 3;
  const int r = batched ? 1 : 0;
  const int64_t B = batched ? a.shape(0) : 1;
  if (batched && b.shape(0) != B) {
    throw py::value_error(std::string(op) + ": batch sizes differ: a " + shape_str(a) +
                          ", b " + shape_str(b));
  }
  const int64_t M = trans_a ? a.shape(r + 1) : a.shape(r);
  const int64_t K = trans_a ? a.shape(r) : a.shape(r + 1);
  const int64_t Kb = trans_b ? b.shape(r + 1) : b.shape(r);
  const int64_t N = trans_b ? b.shape(r) : b.shape(r + 1);
  if (K != Kb) {
    throw py::value_error(std::string(op) + ": inner dimensions differ: op(a) is " +
                          pair_str(M, K) + ", op(b) is " + pair_str(Kb, N));
  }
  return with_dtype(float_dtype(op, "a", a), [&](auto tag) {
    using T = decltype(tag);
    py::array c = batched ? new_array<T>({B, M, N}) : new_array<T>({M, N});
    const T* ap = cptr<T>(a);
    const T* bp = cptr<T>(b);
    T* cp = ptr<T>(c);
    const int64_t lda = a.shape(r + 1), ldb = b.shape(r + 1);
    const int64_t sa = M * K, sb = K * N, sc = M * N;
    {
      py::gil_scoped_release release;
      auto gemm = table<T>().gemm;
      auto one = [&](int64_t i) {
        gemm(trans_a, trans_b, M, N, K, ap + i * sa, lda, bp + i * sb, ldb, cp + i * sc, N,
             false);
      };
      // Many small products: one per thread (gemm then runs serially inside);
      // few large ones: one at a time, each using the whole pool.
      if (B >= fastnn::get_num_threads() && B > 1 && M * N * K < (int64_t(1) << 21)) {
        fastnn::parallel_for(B, 1, [&](int64_t b0, int64_t b1) {
          for (int64_t i = b0; i < b1; ++i) one(i);
        });
      } else {
        for (int64_t i = 0; i < B; ++i) one(i);
      }
    }
    return c;
  });
}

// --- fused linear + relu --------------------------------------------------------

struct LinearArgs {
  py::array x, w;
  std::optional<py::array> b;
  int64_t M, N, K;
};

LinearArgs linear_args(const char* op, const py::handle& x_obj, const py::handle& w_obj,
                       const py::handle& b_obj) {
  LinearArgs a{float_arg(op, "x", x_obj, 2, "(M, in_features)"),
               float_arg(op, "weight", w_obj, 2, "(out_features, in_features)"),
               std::nullopt, 0, 0, 0};
  same_dtype(op, a.x, "x", a.w, "weight");
  if (a.x.shape(1) != a.w.shape(1)) {
    throw py::value_error(std::string(op) + ": x's last dimension must equal in_features=" +
                          std::to_string(a.w.shape(1)) + ", got x of shape " + shape_str(a.x));
  }
  a.M = a.x.shape(0);
  a.K = a.x.shape(1);
  a.N = a.w.shape(0);
  if (!b_obj.is_none()) {
    a.b = float_arg(op, "bias", b_obj, 1, "(out_features,)");
    same_dtype(op, a.x, "x", *a.b, "bias");
    if (a.b->shape(0) != a.N) {
      throw py::value_error(std::string(op) + ": bias must have shape (" + std::to_string(a.N) +
                            ",), got " + shape_str(*a.b));
    }
  }
  return a;
}

py::array linear_relu(const py::handle& x_obj, const py::handle& w_obj,
                      const py::handle& b_obj) {
  const char* op = "linear_relu";
  LinearArgs a = linear_args(op, x_obj, w_obj, b_obj);
  return with_dtype(float_dtype(op, "x", a.x), [&](auto tag) {
    using T = decltype(tag);
    py::array y = new_array<T>({a.M, a.N});
    const T* bp = a.b ? cptr<T>(*a.b) : nullptr;
    T* yp = ptr<T>(y);
    {
      py::gil_scoped_release release;
      table<T>().linear_relu_forward(a.M, a.N, a.K, cptr<T>(a.x), cptr<T>(a.w), bp, yp);
    }
    return y;
  });
}

py::tuple linear_relu_backward(const py::handle& gy_obj, const py::handle& x_obj,
                               const py::handle& w_obj, const py::handle& y_obj, bool need_x,
                               bool need_w, bool need_b) {
  const char* op = "linear_relu_backward";
  LinearArgs a = linear_args(op, x_obj, w_obj, py::none());
  py::array gy = float_arg(op, "grad_out", gy_obj, 2, "(M, out_features)");
  py::array y = float_arg(op, "y", y_obj, 2, "(M, out_features)");
  same_dtype(op, a.x, "x", gy, "grad_out");
  same_dtype(op, a.x, "x", y, "y");
  if (gy.shape(0) != a.M || gy.shape(1) != a.N) {
    throw py::value_error(std::string(op) + ": grad_out must have shape " + pair_str(a.M, a.N) +
                          ", got " + shape_str(gy));
  }
  same_shape(op, gy, "grad_out", y, "y");
  return with_dtype(float_dtype(op, "x", a.x), [&](auto tag) {
    using T = decltype(tag);
    py::object gx = py::none(), gw = py::none(), gb = py::none();
    T *gxp = nullptr, *gwp = nullptr, *gbp = nullptr;
    if (need_x) {
      py::array t = new_array<T>({a.M, a.K});
      gxp = ptr<T>(t);
      gx = t;
    }
    if (need_w) {
      py::array t = new_array<T>({a.N, a.K});
      gwp = ptr<T>(t);
      gw = t;
    }
    if (need_b) {
      py::array t = new_array<T>({a.N});
      gbp = ptr<T>(t);
      gb = t;
    }
    if (gxp || gwp || gbp) {
      py::gil_scoped_release release;
      table<T>().linear_relu_backward(a.M, a.N, a.K, cptr<T>(gy), cptr<T>(a.x), cptr<T>(a.w),
                                      cptr<T>(y), gxp, gwp, gbp);
    }
    return py::make_tuple(gx, gw, gb);
  });
}

// --- CPU and cache information ----------------------------------------------------

py::dict cpu_info_dict() {
  const fastnn::CpuInfo& info = fastnn::cpu_info();
  const fastnn::CacheSizes cs = fastnn::cache_sizes();
  py::dict d;
  d["vendor"] = info.vendor;
  d["family"] = info.family;
  d["model"] = info.model;
  d["stepping"] = info.stepping;
  d["source"] = info.source;
  d["l1d"] = cs.l1d;
  d["l2"] = cs.l2;
  d["l3"] = cs.l3;
  d["l3_shared_by"] = cs.l3_sharing;
  d["detected"] = py::dict(py::arg("l1d") = info.detected.l1d, py::arg("l2") = info.detected.l2,
                           py::arg("l3") = info.detected.l3);
  const std::string spec = fastnn::cache_override();
  d["override"] = spec.empty() ? py::object(py::none()) : py::object(py::str(spec));
  return d;
}

py::dict gemm_blocking_dict(const std::string& dtype) {
  int64_t b[5] = {};
  if (dtype == "float32") {
    table<float>().gemm_blocking(b);
  } else if (dtype == "float64") {
    table<double>().gemm_blocking(b);
  } else {
    throw py::value_error("gemm_blocking: dtype must be 'float32' or 'float64', got '" + dtype +
                          "'");
  }
  return py::dict(py::arg("MR") = b[0], py::arg("NR") = b[1], py::arg("KC") = b[2],
                  py::arg("MC") = b[3], py::arg("NC") = b[4]);
}

void py_set_cache_sizes(const std::string& spec) {
  const std::string err = fastnn::set_cache_sizes(spec);
  if (!err.empty()) throw py::value_error("set_cache_sizes: " + err);
}

// --- pooling ---------------------------------------------------------------------

// Only memory-safety checks here: which geometries are accepted (padding at
// most half the kernel, output size >= 1, ceil_mode's last-window rule, ...)
// is fastnn.geometry's policy, applied by fastnn.functional before any kernel
// runs. The kernels clip every window to the input, so any kernel, stride,
// padding and dilation in range is safe; out_hw is bounded so that every
// window starts inside the padded input, which bounds the kernels' row
// buffers (their length grows with (OW-1)*stride).
Pool2dParams pool_params(const char* op, const py::array& x_like, int64_t H, int64_t W,
                         const Pair& kernel, const Pair& stride, const Pair& padding,
                         const Pair& dilation) {
  check_pair(op, "kernel_size", kernel, 1);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  Pool2dParams p{};
  p.N = x_like.shape(0), p.C = x_like.shape(1), p.H = H, p.W = W;
  p.kh = kernel[0], p.kw = kernel[1], p.sh = stride[0], p.sw = stride[1];
  p.ph = padding[0], p.pw = padding[1], p.dh = dilation[0], p.dw = dilation[1];
  p.count_include_pad = true;
  p.divisor_override = 0;
  return p;
}

void set_pool_out(const char* op, Pool2dParams& p, const Pair& out_hw) {
  check_pair(op, "out_hw", out_hw, 0);
  const int64_t size[2] = {p.H, p.W}, s[2] = {p.sh, p.sw}, pad[2] = {p.ph, p.pw};
  for (int i = 0; i < 2; ++i) {
    // All operands are < 2^31, so the products cannot overflow.
    if (out_hw[i] > 0 && (out_hw[i] - 1) * s[i] >= size[i] + 2 * pad[i]) {
      throw py::value_error(std::string(op) + ": out_hw " + pair_str(out_hw[0], out_hw[1]) +
                            " does not fit the input: on axis " + std::to_string(i) +
                            " its last window would start past the padded input");
    }
  }
  p.OH = out_hw[0];
  p.OW = out_hw[1];
}

void set_divisor(const char* op, Pool2dParams& p, bool count_include_pad,
                 const std::optional<int64_t>& divisor_override) {
  p.count_include_pad = count_include_pad;
  if (divisor_override) {
    if (*divisor_override == 0) {
      throw py::value_error(std::string(op) + ": divisor_override must be non-zero");
    }
    p.divisor_override = *divisor_override;
  }
}

// The parameters of a max_pool2d forward over x (N, C, H, W).
Pool2dParams max_pool_params(const char* op, const py::array& x, const Pair& kernel,
                             const Pair& stride, const Pair& padding, const Pair& dilation,
                             const Pair& out_hw) {
  Pool2dParams p = pool_params(op, x, x.shape(2), x.shape(3), kernel, stride, padding, dilation);
  set_pool_out(op, p, out_hw);
  return p;
}

py::array max_pool2d(const py::handle& x_obj, const Pair& kernel, const Pair& stride,
                     const Pair& padding, const Pair& dilation, const Pair& out_hw) {
  const char* op = "max_pool2d";
  py::array x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  const Pool2dParams p = max_pool_params(op, x, kernel, stride, padding, dilation, out_hw);
  return with_dtype(float_dtype(op, "x", x), [&](auto tag) {
    using T = decltype(tag);
    py::array y = new_array<T>({p.N, p.C, p.OH, p.OW});
    T* yp = ptr<T>(y);
    {
      py::gil_scoped_release release;
      table<T>().max_pool2d_forward(p, cptr<T>(x), yp);
    }
    return y;
  });
}

py::tuple max_pool2d_with_indices(const py::handle& x_obj, const Pair& kernel,
                                  const Pair& stride, const Pair& padding, const Pair& dilation,
                                  const Pair& out_hw) {
  const char* op = "max_pool2d_with_indices";
  py::array x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  const Pool2dParams p = max_pool_params(op, x, kernel, stride, padding, dilation, out_hw);
  return with_dtype(float_dtype(op, "x", x), [&](auto tag) {
    using T = decltype(tag);
    py::array y = new_array<T>({p.N, p.C, p.OH, p.OW});
    py::array ind = new_array<int64_t>({p.N, p.C, p.OH, p.OW});
    T* yp = ptr<T>(y);
    int64_t* ip = static_cast<int64_t*>(ind.mutable_data());
    {
      py::gil_scoped_release release;
      table<T>().max_pool2d_with_indices_forward(p, cptr<T>(x), yp, ip);
    }
    return py::make_tuple(y, ind);
  });
}

void check_pool_grad(const char* op, const py::array& gy, const Pool2dParams& p) {
  if (gy.shape(0) != p.N || gy.shape(1) != p.C) {
    throw py::value_error(std::string(op) + ": grad_out must have batch and channels " +
                          pair_str(p.N, p.C) + ", got shape " + shape_str(gy));
  }
}

py::array max_pool2d_backward(const py::handle& gy_obj, const py::handle& x_obj,
                              const Pair& kernel, const Pair& stride, const Pair& padding,
                              const Pair& dilation) {
  const char* op = "max_pool2d_backward";
  py::array gy = float_arg(op, "grad_out", gy_obj, 4, "(N, C, OH, OW)");
  py::array x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  same_dtype(op, x, "x", gy, "grad_out");
  Pool2dParams p = pool_params(op, x, x.shape(2), x.shape(3), kernel, stride, padding, dilation);
  check_pool_grad(op, gy, p);
  set_pool_out(op, p, {gy.shape(2), gy.shape(3)});
  return with_dtype(float_dtype(op, "x", x), [&](auto tag) {
    using T = decltype(tag);
    py::array gx = new_array<T>({p.N, p.C, p.H, p.W});
    T* gxp = ptr<T>(gx);
    {
      py::gil_scoped_release release;
      table<T>().max_pool2d_backward(p, cptr<T>(gy), cptr<T>(x), gxp);
    }
    return gx;
  });
}

// --- fused conv2d + ReLU + max_pool2d ---------------------------------------------------

struct FusedArgs {
  py::array x, w;
  std::optional<py::array> b;
  Conv2dParams cp;
  Pool2dParams pp;
};

// Checks the conv operands and both geometries; the pool's input is the conv output.
// pool_out_hw is checked by the caller (set_pool_out).
FusedArgs fused_args(const char* op, const py::handle& x_obj, const py::handle& w_obj,
                     const py::handle& b_obj, const Pair& stride, const Pair& padding,
                     const Pair& dilation, int64_t groups, const Pair& pool_kernel,
                     const Pair& pool_stride, const Pair& pool_padding,
                     const Pair& pool_dilation) {
  FusedArgs a;
  a.x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  a.w = float_arg(op, "weight", w_obj, 4, "(O, C/groups, KH, KW)");
  same_dtype(op, a.x, "x", a.w, "weight");
  if (!b_obj.is_none()) {
    a.b = float_arg(op, "bias", b_obj, 1, "(O,)");
    same_dtype(op, a.x, "x", *a.b, "bias");
    if (a.b->shape(0) != a.w.shape(0)) {
      throw py::value_error(std::string(op) + ": bias must have shape (" +
                            std::to_string(a.w.shape(0)) + ",), got " + shape_str(*a.b));
    }
  }
  check_conv_geometry(op, stride, padding, dilation, groups);
  a.cp = conv_params(op, a.x.shape(0), a.x.shape(1), a.x.shape(2), a.x.shape(3), a.w.shape(0),
                     a.w.shape(1), a.w.shape(2), a.w.shape(3), stride, padding, dilation, groups);
  a.pp = pool_params(op, a.x, a.cp.OH, a.cp.OW, pool_kernel, pool_stride, pool_padding,
                     pool_dilation);
  a.pp.C = a.cp.O;
  return a;
}

// The forward's window codes, checked against the pool so that the backward
// never writes outside the conv-output gradient: uint8 (N, O, POH, POW),
// C-contiguous, every code < KH*KW or 255.
py::array argmax_arg(const char* op, const py::handle& obj, const Pool2dParams& pp) {
  py::array a = as_array(op, "argmax", obj);
  if (!a.dtype().is(py::dtype::of<uint8_t>())) {
    throw py::type_error(std::string(op) + ": argmax must be uint8 (the forward's codes), got " +
                         dtype_str(a));
  }
  const bool shape_ok = a.ndim() == 4 && a.shape(0) == pp.N && a.shape(1) == pp.C &&
                        a.shape(2) == pp.OH && a.shape(3) == pp.OW;
  if (!shape_ok) {
    throw py::value_error(std::string(op) + ": argmax must have shape (" +
                          std::to_string(pp.N) + ", " + std::to_string(pp.C) + ", " +
                          std::to_string(pp.OH) + ", " + std::to_string(pp.OW) + "), got " +
                          shape_str(a));
  }
  check_contiguous(op, "argmax", a);
  const auto* c = static_cast<const uint8_t*>(a.data());
  const int64_t n = pp.N * pp.C * pp.OH * pp.OW;
  const int taps = int(pp.kh * pp.kw);
  // 255 + 1 wraps to 0, so one unsigned max (which vectorises) finds a bad code.
  uint8_t top = 0;
  {
    py::gil_scoped_release release;
    for (int64_t i = 0; i < n; ++i) top = std::max<uint8_t>(top, uint8_t(c[i] + 1));
  }
  if (top > taps) {
    throw py::value_error(std::string(op) + ": argmax holds codes other than 0.." +
                          std::to_string(taps - 1) + " and 255 (not this op's forward output)");
  }
  return a;
}

py::object conv2d_relu_max_pool2d(const py::handle& x_obj, const py::handle& w_obj,
                                  const py::handle& b_obj, const Pair& stride,
                                  const Pair& padding, const Pair& dilation, int64_t groups,
                                  const Pair& pool_kernel, const Pair& pool_stride,
                                  const Pair& pool_padding, const Pair& pool_dilation,
                                  const Pair& pool_out_hw, bool return_argmax) {
  const char* op = "conv2d_relu_max_pool2d";
  FusedArgs a = fused_args(op, x_obj, w_obj, b_obj, stride, padding, dilation, groups,
                           pool_kernel, pool_stride, pool_padding, pool_dilation);
  set_pool_out(op, a.pp, pool_out_hw);
  if (return_argmax && a.pp.kh * a.pp.kw > 255) {
    throw py::value_error(std::string(op) + ": return_argmax needs a pool window of at most "
                          "255 taps, got " + std::to_string(a.pp.kh) + "x" +
                          std::to_string(a.pp.kw));
  }
  return with_dtype(float_dtype(op, "x", a.x), [&](auto tag) -> py::object {
    using T = decltype(tag);
    py::array y = new_array<T>({a.pp.N, a.pp.C, a.pp.OH, a.pp.OW});
    py::array codes;
    uint8_t* cp = nullptr;
    if (return_argmax) {
      codes = new_array<uint8_t>({a.pp.N, a.pp.C, a.pp.OH, a.pp.OW});
      cp = static_cast<uint8_t*>(codes.mutable_data());
    }
    const T* bp = a.b ? cptr<T>(*a.b) : nullptr;
    T* yp = ptr<T>(y);
    {
      py::gil_scoped_release release;
      table<T>().conv2d_relu_maxpool_forward(a.cp, a.pp, cptr<T>(a.x), cptr<T>(a.w), bp, yp,
                                             cp);
    }
    if (return_argmax) return py::make_tuple(y, codes);
    return std::move(y);
  });
}

py::tuple conv2d_relu_max_pool2d_backward(
    const py::handle& gy_obj, const py::handle& x_obj, const py::handle& w_obj,
    const py::handle& b_obj, const Pair& stride, const Pair& padding, const Pair& dilation,
    int64_t groups, const Pair& pool_kernel, const Pair& pool_stride, const Pair& pool_padding,
    const Pair& pool_dilation, bool need_x, bool need_w, bool need_b,
    const py::handle& argmax_obj) {
  const char* op = "conv2d_relu_max_pool2d_backward";
  py::array gy = float_arg(op, "grad_out", gy_obj, 4, "(N, O, POH, POW)");
  FusedArgs a = fused_args(op, x_obj, w_obj, b_obj, stride, padding, dilation, groups,
                           pool_kernel, pool_stride, pool_padding, pool_dilation);
  same_dtype(op, a.x, "x", gy, "grad_out");
  check_pool_grad(op, gy, a.pp);
  set_pool_out(op, a.pp, {gy.shape(2), gy.shape(3)});
  std::optional<py::array> codes;
  if (!argmax_obj.is_none()) codes = argmax_arg(op, argmax_obj, a.pp);
  return with_dtype(float_dtype(op, "x", a.x), [&](auto tag) {
    using T = decltype(tag);
    const Conv2dParams& p = a.cp;
    py::object gx = py::none(), gw = py::none(), gb = py::none();
    T *gxp = nullptr, *gwp = nullptr, *gbp = nullptr;
    if (need_x) {
      py::array t = new_array<T>({p.N, p.C, p.H, p.W});
      gxp = ptr<T>(t);
      gx = t;
    }
    if (need_w) {
      py::array t = new_array<T>({p.O, p.C / p.groups, p.KH, p.KW});
      gwp = ptr<T>(t);
      gw = t;
    }
    if (need_b) {
      py::array t = new_array<T>({p.O});
      gbp = ptr<T>(t);
      gb = t;
    }
    const T* bp = a.b ? cptr<T>(*a.b) : nullptr;
    const uint8_t* cp = codes ? static_cast<const uint8_t*>(codes->data()) : nullptr;
    if (gxp || gwp || gbp) {
      py::gil_scoped_release release;
      table<T>().conv2d_relu_maxpool_backward(p, a.pp, cptr<T>(gy), cptr<T>(a.x), cptr<T>(a.w),
                                              bp, cp, gxp, gwp, gbp);
    }
    return py::make_tuple(gx, gw, gb);
  });
}

py::array avg_pool2d(const py::handle& x_obj, const Pair& kernel, const Pair& stride,
                     const Pair& padding, const Pair& out_hw, bool count_include_pad,
                     std::optional<int64_t> divisor_override) {
  const char* op = "avg_pool2d";
  py::array x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  Pool2dParams p = pool_params(op, x, x.shape(2), x.shape(3), kernel, stride, padding, {1, 1});
  set_pool_out(op, p, out_hw);
  set_divisor(op, p, count_include_pad, divisor_override);
  return with_dtype(float_dtype(op, "x", x), [&](auto tag) {
    using T = decltype(tag);
    py::array y = new_array<T>({p.N, p.C, p.OH, p.OW});
    T* yp = ptr<T>(y);
    {
      py::gil_scoped_release release;
      table<T>().avg_pool2d_forward(p, cptr<T>(x), yp);
    }
    return y;
  });
}

py::array avg_pool2d_backward(const py::handle& gy_obj, const Pair& input_hw, const Pair& kernel,
                              const Pair& stride, const Pair& padding, bool count_include_pad,
                              std::optional<int64_t> divisor_override) {
  const char* op = "avg_pool2d_backward";
  py::array gy = float_arg(op, "grad_out", gy_obj, 4, "(N, C, OH, OW)");
  check_pair(op, "input_hw", input_hw, 1);
  Pool2dParams p = pool_params(op, gy, input_hw[0], input_hw[1], kernel, stride, padding, {1, 1});
  set_pool_out(op, p, {gy.shape(2), gy.shape(3)});
  set_divisor(op, p, count_include_pad, divisor_override);
  return with_dtype(float_dtype(op, "grad_out", gy), [&](auto tag) {
    using T = decltype(tag);
    py::array gx = new_array<T>({p.N, p.C, p.H, p.W});
    T* gxp = ptr<T>(gx);
    {
      py::gil_scoped_release release;
      table<T>().avg_pool2d_backward(p, cptr<T>(gy), gxp);
    }
    return gx;
  });
}

// --- elementwise -----------------------------------------------------------------

// The indices of a C-contiguous 1-D int64 array, each checked to be in [0,
// bound) (len >= 0: the required length). Returned as a copy, taken with the GIL
// held: the kernels index memory with them after the GIL is released, when
// another Python thread could write to the array.
std::vector<int64_t> index_arg(const char* op, const char* name, const py::handle& obj,
                               int64_t len, int64_t bound) {
  py::array a = as_array(op, name, obj);
  const py::dtype dt = a.dtype();
  if (!(dt.kind() == 'i' && dt.itemsize() == 8 && native_order(dt))) {
    throw py::type_error(std::string(op) + ": " + name + " must be int64, got " + dtype_str(a));
  }
  if (a.ndim() != 1 || (len >= 0 && a.shape(0) != len)) {
    throw py::value_error(std::string(op) + ": " + name + " must have shape (" +
                          (len >= 0 ? std::to_string(len) : std::string("B")) + ",), got " +
                          shape_str(a));
  }
  check_contiguous(op, name, a);
  const auto* p = static_cast<const int64_t*>(a.data());
  std::vector<int64_t> out(p, p + a.shape(0));
  for (size_t i = 0; i < out.size(); ++i) {
    if (out[i] < 0 || out[i] >= bound) {
      throw py::value_error(std::string(op) + ": " + name + " must be in [0, " +
                            std::to_string(bound) + "), got " + std::to_string(out[i]) +
                            " at index " + std::to_string(i));
    }
  }
  return out;
}

std::vector<py::ssize_t> shape_of(const py::array& a) {
  return std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim());
}

py::array relu(const py::handle& x_obj) {
  const char* op = "relu";
  py::array x = float_arg(op, "x", x_obj, -1, "");
  return with_dtype(float_dtype(op, "x", x), [&](auto tag) {
    using T = decltype(tag);
    py::array y = new_array<T>(shape_of(x));
    T* yp = ptr<T>(y);
    const int64_t n = x.size();
    {
      py::gil_scoped_release release;
      table<T>().relu(cptr<T>(x), yp, n);
    }
    return y;
  });
}

py::array relu_backward(const py::handle& gy_obj, const py::handle& y_obj) {
  const char* op = "relu_backward";
  py::array gy = float_arg(op, "grad_out", gy_obj, -1, "");
  py::array y = float_arg(op, "y", y_obj, -1, "");
  same_dtype(op, y, "y", gy, "grad_out");
  same_shape(op, y, "y", gy, "grad_out");
  return with_dtype(float_dtype(op, "y", y), [&](auto tag) {
    using T = decltype(tag);
    py::array gx = new_array<T>(shape_of(y));
    T* gxp = ptr<T>(gx);
    const int64_t n = y.size();
    {
      py::gil_scoped_release release;
      table<T>().relu_backward(cptr<T>(gy), cptr<T>(y), gxp, n);
    }
    return gx;
  });
}

py::tuple softmax_cross_entropy(const py::handle& logits_obj, const py::handle& labels_obj) {
  const char* op = "softmax_cross_entropy";
  py::array z = float_arg(op, "logits", logits_obj, 2, "(N, K)");
  const int64_t N = z.shape(0), K = z.shape(1);
  if (N > 0 && K == 0) {
    throw py::value_error(std::string(op) + ": logits must have at least one class");
  }
  const std::vector<int64_t> labels = index_arg(op, "labels", labels_obj, N, K);
  const int64_t* lp = labels.data();
  return with_dtype(float_dtype(op, "logits", z), [&](auto tag) {
    using T = decltype(tag);
    py::array loss = new_array<T>({});
    py::array grad = new_array<T>({N, K});
    T* lossp = ptr<T>(loss);
    T* gp = ptr<T>(grad);
    {
      py::gil_scoped_release release;
      table<T>().softmax_cross_entropy(cptr<T>(z), lp, N, K, lossp, gp);
    }
    return py::make_tuple(loss, grad);
  });
}

py::array lookup_u8(const py::handle& images_obj, const py::handle& rows_obj,
                    const py::handle& table_obj) {
  const char* op = "lookup_u8";
  py::array images = as_array(op, "images", images_obj);
  const py::dtype idt = images.dtype();
  if (!(idt.kind() == 'u' && idt.itemsize() == 1)) {
    throw py::type_error(std::string(op) + ": images must be uint8, got " + dtype_str(images));
  }
  if (images.ndim() < 1) {
    throw py::value_error(std::string(op) + ": images must have a leading (n,) axis, got shape " +
                          shape_str(images));
  }
  check_contiguous(op, "images", images);
  py::array tab = float_arg(op, "table", table_obj, 1, "(256,)");
  if (tab.shape(0) != 256) {
    throw py::value_error(std::string(op) + ": table must have shape (256,), got " +
                          shape_str(tab));
  }
  const int64_t n = images.shape(0);
  const int64_t row_len = n > 0 ? images.size() / n : 0;
  const bool all_rows = rows_obj.is_none();
  const std::vector<int64_t> rows =
      all_rows ? std::vector<int64_t>() : index_arg(op, "rows", rows_obj, -1, n);
  const int64_t B = all_rows ? n : static_cast<int64_t>(rows.size());
  std::vector<py::ssize_t> shape = shape_of(images);
  shape[0] = B;
  const int64_t* rp = all_rows ? nullptr : rows.data();
  return with_dtype(float_dtype(op, "table", tab), [&](auto tag) {
    using T = decltype(tag);
    py::array out = new_array<T>(shape);
    T* outp = ptr<T>(out);
    const auto* src = static_cast<const uint8_t*>(images.data());
    {
      py::gil_scoped_release release;
      table<T>().lookup_u8(src, row_len, rp, B, cptr<T>(tab), outp);
    }
    return out;
  });
}

// --- batch norm --------------------------------------------------------------------

// A (C,) array of x's dtype, C = x.shape[1].
py::array channel_arg(const char* op, const char* name, const py::handle& obj,
                      const py::array& x) {
  py::array a = float_arg(op, name, obj, 1, "(C,)");
  same_dtype(op, x, "x", a, name);
  if (a.shape(0) != x.shape(1)) {
    throw py::value_error(std::string(op) + ": " + name + " must have shape (" +
                          std::to_string(x.shape(1)) + ",), got " + shape_str(a));
  }
  return a;
}

std::optional<py::array> optional_channel_arg(const char* op, const char* name,
                                              const py::handle& obj, const py::array& x) {
  if (obj.is_none()) return std::nullopt;
  return channel_arg(op, name, obj, x);
}

void check_eps(const char* op, double eps) {
  if (!(eps >= 0) || !std::isfinite(eps)) {
    throw py::value_error(std::string(op) + ": eps must be a finite number >= 0, got " +
                          std::to_string(eps));
  }
}

template <typename T>
const T* cptr_or_null(const std::optional<py::array>& a) {
  return a ? cptr<T>(*a) : nullptr;
}

// The checked arguments of a BatchNorm forward (batch_norm2d, batch_norm2d_relu
// and batch_norm2d_relu_max_pool2d).
struct BnArgs {
  py::array x;
  std::optional<py::array> w, b, mean, var;
  int64_t N, C, HW;
};

BnArgs bn_forward_args(const char* op, const py::handle& x_obj, const py::handle& w_obj,
                       const py::handle& b_obj, const py::handle& mean_obj,
                       const py::handle& var_obj, double eps, bool training) {
  BnArgs a;
  a.x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  a.w = optional_channel_arg(op, "weight", w_obj, a.x);
  a.b = optional_channel_arg(op, "bias", b_obj, a.x);
  a.mean = optional_channel_arg(op, "mean", mean_obj, a.x);
  a.var = optional_channel_arg(op, "var", var_obj, a.x);
  check_eps(op, eps);
  a.N = a.x.shape(0), a.C = a.x.shape(1), a.HW = a.x.shape(2) * a.x.shape(3);
  if (training) {
    if (a.mean || a.var) {
      throw py::value_error(std::string(op) +
                            ": mean and var must be None when training (they are computed)");
    }
    if (a.N * a.HW < 2) {
      throw py::value_error(std::string(op) +
                            ": expected more than 1 value per channel when training, got input "
                            "of shape " + shape_str(a.x));
    }
  } else if (!a.mean || !a.var) {
    throw py::value_error(std::string(op) + ": mean and var must be arrays when not training");
  }
  return a;
}

// Fresh (C,) arrays for the statistics a BatchNorm forward returns: filled with
// the given ones unless training (the kernel computes them then).
template <typename T>
std::pair<py::array, py::array> bn_stats_out(const BnArgs& a, bool training) {
  py::array mean_out = new_array<T>({a.C});
  py::array var_out = new_array<T>({a.C});
  if (!training) {
    std::memcpy(ptr<T>(mean_out), cptr<T>(*a.mean), static_cast<size_t>(a.C) * sizeof(T));
    std::memcpy(ptr<T>(var_out), cptr<T>(*a.var), static_cast<size_t>(a.C) * sizeof(T));
  }
  return {mean_out, var_out};
}

// batch_norm2d and batch_norm2d_relu (relu: the fused ReLU kernel).
py::tuple batch_norm2d_impl(const char* op, bool relu, const py::handle& x_obj,
                            const py::handle& w_obj, const py::handle& b_obj,
                            const py::handle& mean_obj, const py::handle& var_obj, double eps,
                            bool training) {
  const BnArgs a = bn_forward_args(op, x_obj, w_obj, b_obj, mean_obj, var_obj, eps, training);
  return with_dtype(float_dtype(op, "x", a.x), [&](auto tag) {
    using T = decltype(tag);
    py::array y = new_array<T>(shape_of(a.x));
    auto [mean_out, var_out] = bn_stats_out<T>(a, training);
    T* mp = ptr<T>(mean_out);
    T* vp = ptr<T>(var_out);
    const T* xp = cptr<T>(a.x);
    const T* wp = cptr_or_null<T>(a.w);
    const T* bp = cptr_or_null<T>(a.b);
    T* yp = ptr<T>(y);
    {
      py::gil_scoped_release release;
      const auto& t = table<T>();
      (relu ? t.batch_norm2d_relu_forward : t.batch_norm2d_forward)(a.N, a.C, a.HW, xp, wp, bp,
                                                                   mp, vp, eps, training, yp);
    }
    return py::make_tuple(y, mean_out, var_out);
  });
}

py::tuple batch_norm2d(const py::handle& x, const py::handle& weight, const py::handle& bias,
                       const py::handle& mean, const py::handle& var, double eps,
                       bool training) {
  return batch_norm2d_impl("batch_norm2d", false, x, weight, bias, mean, var, eps, training);
}

py::tuple batch_norm2d_relu(const py::handle& x, const py::handle& weight,
                            const py::handle& bias, const py::handle& mean,
                            const py::handle& var, double eps, bool training) {
  return batch_norm2d_impl("batch_norm2d_relu", true, x, weight, bias, mean, var, eps, training);
}

// The checked arguments of a BatchNorm backward beside grad_out; bias only with
// relu (the forward's bias, to recompute its output).
struct BnGradArgs {
  py::array x, mean, var;
  std::optional<py::array> w, b;
  int64_t N, C, HW;
};

BnGradArgs bn_backward_args(const char* op, bool relu, const py::handle& x_obj,
                            const py::handle& w_obj, const py::handle& b_obj,
                            const py::handle& mean_obj, const py::handle& var_obj, double eps) {
  BnGradArgs a;
  a.x = float_arg(op, "x", x_obj, 4, "(N, C, H, W)");
  a.w = optional_channel_arg(op, "weight", w_obj, a.x);
  if (relu) a.b = optional_channel_arg(op, "bias", b_obj, a.x);
  a.mean = channel_arg(op, "mean", mean_obj, a.x);
  a.var = channel_arg(op, "var", var_obj, a.x);
  check_eps(op, eps);
  a.N = a.x.shape(0), a.C = a.x.shape(1), a.HW = a.x.shape(2) * a.x.shape(3);
  return a;
}

// (grad_x, grad_weight, grad_bias) arrays, each None unless wanted.
template <typename T>
struct BnGrads {
  py::object gx = py::none(), gw = py::none(), gb = py::none();
  T *gxp = nullptr, *gwp = nullptr, *gbp = nullptr;
  BnGrads(const py::array& x, bool need_x, bool need_w, bool need_b) {
    const int64_t C = x.shape(1);
    if (need_x) {
      py::array t = new_array<T>(shape_of(x));
      gxp = ptr<T>(t);
      gx = t;
    }
    if (need_w) {
      py::array t = new_array<T>({C});
      gwp = ptr<T>(t);
      gw = t;
    }
    if (need_b) {
      py::array t = new_array<T>({C});
      gbp = ptr<T>(t);
      gb = t;
    }
  }
  bool any() const { return gxp || gwp || gbp; }
  py::tuple tuple() const { return py::make_tuple(gx, gw, gb); }
};

// batch_norm2d_backward and, with relu (b_obj: the forward's bias),
// batch_norm2d_relu_backward.
py::tuple batch_norm2d_backward_impl(const char* op, bool relu, const py::handle& gy_obj,
                                     const py::handle& x_obj, const py::handle& w_obj,
                                     const py::handle& b_obj, const py::handle& mean_obj,
                                     const py::handle& var_obj, double eps, bool training,
                                     bool need_x, bool need_w, bool need_b) {
  py::array gy = float_arg(op, "grad_out", gy_obj, 4, "(N, C, H, W)");
  const BnGradArgs a = bn_backward_args(op, relu, x_obj, w_obj, b_obj, mean_obj, var_obj, eps);
  same_dtype(op, a.x, "x", gy, "grad_out");
  same_shape(op, a.x, "x", gy, "grad_out");
  return with_dtype(float_dtype(op, "x", a.x), [&](auto tag) {
    using T = decltype(tag);
    BnGrads<T> g(a.x, need_x, need_w, need_b);
    const T* gyp = cptr<T>(gy);
    const T* xp = cptr<T>(a.x);
    const T* wp = cptr_or_null<T>(a.w);
    const T* mp = cptr<T>(a.mean);
    const T* vp = cptr<T>(a.var);
    const T* bp = cptr_or_null<T>(a.b);
    if (g.any()) {
      py::gil_scoped_release release;
      if (relu) {
        table<T>().batch_norm2d_relu_backward(a.N, a.C, a.HW, gyp, xp, wp, bp, mp, vp, eps,
                                              training, g.gxp, g.gwp, g.gbp);
      } else {
        table<T>().batch_norm2d_backward(a.N, a.C, a.HW, gyp, xp, wp, mp, vp, eps, training,
                                         g.gxp, g.gwp, g.gbp);
      }
    }
    return g.tuple();
  });
}

py::tuple batch_norm2d_backward(const py::handle& grad_out, const py::handle& x,
                                const py::handle& weight, const py::handle& mean,
                                const py::handle& var, double eps, bool training, bool need_x,
                                bool need_w, bool need_b) {
  return batch_norm2d_backward_impl("batch_norm2d_backward", false, grad_out, x, weight,
                                    py::none(), mean, var, eps, training, need_x, need_w, need_b);
}

py::tuple batch_norm2d_relu_backward(const py::handle& grad_out, const py::handle& x,
                                     const py::handle& weight, const py::handle& bias,
                                     const py::handle& mean, const py::handle& var, double eps,
                                     bool training, bool need_x, bool need_w, bool need_b) {
  return batch_norm2d_backward_impl("batch_norm2d_relu_backward", true, grad_out, x, weight,
                                    bias, mean, var, eps, training, need_x, need_w, need_b);
}

// batch_norm2d_relu_max_pool2d: the pool geometry over x (N, C, H, W).
Pool2dParams bn_pool_params(const char* op, const py::array& x, const Pair& kernel,
                            const Pair& stride, const Pair& padding, const Pair& dilation,
                            const Pair& out_hw, bool codes) {
  Pool2dParams p = max_pool_params(op, x, kernel, stride, padding, dilation, out_hw);
  if (codes && p.kh * p.kw > 255) {
    throw py::value_error(std::string(op) + ": argmax needs a pool window of at most 255 taps, "
                          "got " + std::to_string(p.kh) + "x" + std::to_string(p.kw));
  }
  return p;
}

py::tuple batch_norm2d_relu_max_pool2d(const py::handle& x_obj, const py::handle& w_obj,
                                       const py::handle& b_obj, const py::handle& mean_obj,
                                       const py::handle& var_obj, double eps, bool training,
                                       const Pair& pool_kernel, const Pair& pool_stride,
                                       const Pair& pool_padding, const Pair& pool_dilation,
                                       const Pair& pool_out_hw, bool return_argmax) {
  const char* op = "batch_norm2d_relu_max_pool2d";
  const BnArgs a = bn_forward_args(op, x_obj, w_obj, b_obj, mean_obj, var_obj, eps, training);
  const Pool2dParams pp = bn_pool_params(op, a.x, pool_kernel, pool_stride, pool_padding,
                                         pool_dilation, pool_out_hw, return_argmax);
  return with_dtype(float_dtype(op, "x", a.x), [&](auto tag) -> py::tuple {
    using T = decltype(tag);
    py::array y = new_array<T>({pp.N, pp.C, pp.OH, pp.OW});
    auto [mean_out, var_out] = bn_stats_out<T>(a, training);
    py::array codes;
    uint8_t* cp = nullptr;
    if (return_argmax) {
      codes = new_array<uint8_t>({pp.N, pp.C, pp.OH, pp.OW});
      cp = static_cast<uint8_t*>(codes.mutable_data());
    }
    T* mp = ptr<T>(mean_out);
    T* vp = ptr<T>(var_out);
    const T* xp = cptr<T>(a.x);
    const T* wp = cptr_or_null<T>(a.w);
    const T* bp = cptr_or_null<T>(a.b);
    T* yp = ptr<T>(y);
    {
      py::gil_scoped_release release;
      table<T>().batch_norm2d_relu_maxpool_forward(pp, xp, wp, bp, mp, vp, eps, training, yp,
                                                   cp);
    }
    if (return_argmax) return py::make_tuple(y, mean_out, var_out, codes);
    return py::make_tuple(y, mean_out, var_out);
  });
}

py::tuple batch_norm2d_relu_max_pool2d_backward(
    const py::handle& gy_obj, const py::handle& x_obj, const py::handle& w_obj,
    const py::handle& b_obj, const py::handle& mean_obj, const py::handle& var_obj, double eps,
    bool training, const Pair& pool_kernel, const Pair& pool_stride, const Pair& pool_padding,
    const Pair& pool_dilation, bool need_x, bool need_w, bool need_b,
    const py::handle& argmax_obj) {
  const char* op = "batch_norm2d_relu_max_pool2d_backward";
  py::array gy = float_arg(op, "grad_out", gy_obj, 4, "(N, C, POH, POW)");
  const BnGradArgs a = bn_backward_args(op, true, x_obj, w_obj, b_obj, mean_obj, var_obj, eps);
  same_dtype(op, a.x, "x", gy, "grad_out");
  Pool2dParams pp = pool_params(op, a.x, a.x.shape(2), a.x.shape(3), pool_kernel, pool_stride,
                                pool_padding, pool_dilation);
  check_pool_grad(op, gy, pp);
  set_pool_out(op, pp, {gy.shape(2), gy.shape(3)});
  std::optional<py::array> codes;
  if (!argmax_obj.is_none()) codes = argmax_arg(op, argmax_obj, pp);
  return with_dtype(float_dtype(op, "x", a.x), [&](auto tag) {
    using T = decltype(tag);
    BnGrads<T> g(a.x, need_x, need_w, need_b);
    const uint8_t* cp = codes ? static_cast<const uint8_t*>(codes->data()) : nullptr;
    if (g.any()) {
      const T* gyp = cptr<T>(gy);
      const T* xp = cptr<T>(a.x);
      const T* wp = cptr_or_null<T>(a.w);
      const T* bp = cptr_or_null<T>(a.b);
      const T* mp = cptr<T>(a.mean);
      const T* vp = cptr<T>(a.var);
      py::gil_scoped_release release;
      table<T>().batch_norm2d_relu_maxpool_backward(pp, gyp, xp, wp, bp, mp, vp, eps, training,
                                                    cp, g.gxp, g.gwp, g.gbp);
    }
    return g.tuple();
  });
}

// --- optimizer steps ---------------------------------------------------------------

py::array state_arg(const char* op, const char* name, const py::handle& obj,
                    const py::array& param, const char* param_name) {
  py::array a = float_arg(op, name, obj, -1, "");
  same_dtype(op, param, param_name, a, name);
  same_shape(op, param, param_name, a, name);
  return a;
}

// One parameter's arrays for an optimizer step, checked: param and the state
// (s0, s1; s1 or both may be absent) writeable, grad read; one dtype and shape;
// no two sharing memory. The names are those of the single-tensor ops
// ("param", "exp_avg") or, in a multi-tensor op, of list entries ("params[3]").
// The arrays are held (a list entry replaced while the GIL is released stays
// alive) and their data pointers taken while the GIL is held.
struct StepEntry {
  py::array param, grad;
  std::optional<py::array> s0, s1;
  DType dtype = DType::f32;
  void *p = nullptr, *m = nullptr, *v = nullptr;
  const void* g = nullptr;
  int64_t n = 0, step = 0;
};

StepEntry step_entry(const char* op, const std::string (&names)[4], const py::handle& param_obj,
                     const py::handle& grad_obj, const py::handle& s0_obj,
                     const py::handle& s1_obj) {
  StepEntry e;
  const char* pn = names[0].c_str();
  e.param = float_arg(op, pn, param_obj, -1, "");
  check_writeable(op, pn, e.param);
  e.grad = state_arg(op, names[1].c_str(), grad_obj, e.param, pn);
  no_overlap(op, e.param, pn, e.grad, names[1].c_str());
  const py::handle objs[2] = {s0_obj, s1_obj};
  std::optional<py::array>* slots[2] = {&e.s0, &e.s1};
  for (int k = 0; k < 2; ++k) {
    if (objs[k].is_none()) continue;
    const char* sn = names[2 + k].c_str();
    py::array a = state_arg(op, sn, objs[k], e.param, pn);
    check_writeable(op, sn, a);
    no_overlap(op, e.param, pn, a, sn);
    no_overlap(op, e.grad, names[1].c_str(), a, sn);
    if (k == 1 && e.s0) no_overlap(op, *e.s0, names[2].c_str(), a, sn);
    *slots[k] = a;
  }
  e.dtype = float_dtype(op, pn, e.param);
  e.p = e.param.mutable_data();
  e.g = e.grad.data();
  e.m = e.s0 ? e.s0->mutable_data() : nullptr;
  e.v = e.s1 ? e.s1->mutable_data() : nullptr;
  e.n = e.param.size();
  return e;
}

// Adam's state arrays are required: None is a TypeError before anything else is
// checked (fastnn.backends._composed checks in the same order).
void require_state(const char* op, const std::string& name, const py::handle& obj) {
  if (obj.is_none()) {
    throw py::type_error(std::string(op) + ": " + name + " must be an array, got None");
  }
}

void check_step_count(const char* op, const std::string& name, int64_t step) {
  if (step < 1) {
    throw py::value_error(std::string(op) + ": " + name + " must be >= 1 (1-based), got " +
                          std::to_string(step));
  }
}

// A multi-tensor op's list argument: a list or tuple of `n` entries (n < 0: any).
py::sequence list_arg(const char* op, const char* name, const py::handle& obj, py::ssize_t n) {
  if (!py::isinstance<py::list>(obj) && !py::isinstance<py::tuple>(obj)) {
    throw py::type_error(std::string(op) + ": " + name + " must be a list or tuple, got " +
                         py::str(py::type::of(obj).attr("__name__")).cast<std::string>());
  }
  auto seq = py::reinterpret_borrow<py::sequence>(obj);
  if (n >= 0 && py::len(seq) != size_t(n)) {
    throw py::value_error(std::string(op) + ": " + name + " has " +
                          std::to_string(py::len(seq)) + " entries, params has " +
                          std::to_string(n));
  }
  return seq;
}

std::string entry_name(const char* list, size_t i) {
  return std::string(list) + "[" + std::to_string(i) + "]";
}

// The kernels of one entry; no Python API (runs with the GIL released).
void run_sgd(const StepEntry& e, double lr, double momentum, double weight_decay,
             bool nesterov) {
  with_dtype(e.dtype, [&](auto tag) {
    using T = decltype(tag);
    table<T>().sgd_step(static_cast<T*>(e.p), static_cast<const T*>(e.g),
                        static_cast<T*>(e.m), e.n, lr, momentum, weight_decay, nesterov);
    return 0;
  });
}

void run_adam(const StepEntry& e, double lr, double beta1, double beta2, double eps,
              double weight_decay, bool decoupled) {
  with_dtype(e.dtype, [&](auto tag) {
    using T = decltype(tag);
    table<T>().adam_step(static_cast<T*>(e.p), static_cast<const T*>(e.g), static_cast<T*>(e.m),
                         static_cast<T*>(e.v), e.n, e.step, lr, beta1, beta2, eps, weight_decay,
                         decoupled);
    return 0;
  });
}

void sgd_step(const py::handle& param_obj, const py::handle& grad_obj, const py::handle& buf_obj,
              double lr, double momentum, double weight_decay, bool nesterov) {
  const char* op = "sgd_step";
  static const std::string names[4] = {"param", "grad", "momentum_buf", ""};
  if (buf_obj.is_none() && momentum != 0) {
    throw py::value_error(std::string(op) + ": momentum_buf must be an array when momentum != 0");
  }
  const StepEntry e = step_entry(op, names, param_obj, grad_obj, buf_obj, py::none());
  py::gil_scoped_release release;
  run_sgd(e, lr, momentum, weight_decay, nesterov);
}

void adam_step(const py::handle& param_obj, const py::handle& grad_obj, const py::handle& m_obj,
               const py::handle& v_obj, int64_t step, double lr, double beta1, double beta2,
               double eps, double weight_decay, bool decoupled) {
  const char* op = "adam_step";
  static const std::string names[4] = {"param", "grad", "exp_avg", "exp_avg_sq"};
  check_step_count(op, "step", step);
  require_state(op, names[2], m_obj);
  require_state(op, names[3], v_obj);
  StepEntry e = step_entry(op, names, param_obj, grad_obj, m_obj, v_obj);
  e.step = step;
  py::gil_scoped_release release;
  run_adam(e, lr, beta1, beta2, eps, weight_decay, decoupled);
}

// The multi-tensor steps: what an optimizer does for one parameter group, in one
// call. Every entry is checked as the single-tensor op checks it, all before
// any update; then the entries run in order with the GIL released once.
void sgd_step_multi(const py::handle& params_obj, const py::handle& grads_obj,
                    const py::handle& bufs_obj, double lr, double momentum,
                    double weight_decay, bool nesterov) {
  const char* op = "sgd_step_multi";
  const py::sequence params = list_arg(op, "params", params_obj, -1);
  const py::ssize_t n = py::ssize_t(py::len(params));
  const py::sequence grads = list_arg(op, "grads", grads_obj, n);
  std::optional<py::sequence> bufs;
  if (!bufs_obj.is_none()) bufs = list_arg(op, "momentum_bufs", bufs_obj, n);
  std::vector<StepEntry> entries;
  entries.reserve(size_t(n));
  for (size_t i = 0; i < size_t(n); ++i) {
    const std::string names[4] = {entry_name("params", i), entry_name("grads", i),
                                  entry_name("momentum_bufs", i), ""};
    const py::handle buf = bufs ? py::handle((*bufs)[i]) : py::handle(py::none());
    if (buf.is_none() && momentum != 0) {
      throw py::value_error(std::string(op) + ": " + names[2] +
                            " is required when momentum != 0");
    }
    entries.push_back(step_entry(op, names, params[i], grads[i], buf, py::none()));
  }
  py::gil_scoped_release release;
  for (const StepEntry& e : entries) run_sgd(e, lr, momentum, weight_decay, nesterov);
}

void adam_step_multi(const py::handle& params_obj, const py::handle& grads_obj,
                     const py::handle& m_obj, const py::handle& v_obj,
                     const py::handle& steps_obj, double lr, double beta1, double beta2,
                     double eps, double weight_decay, bool decoupled) {
  const char* op = "adam_step_multi";
  const py::sequence params = list_arg(op, "params", params_obj, -1);
  const py::ssize_t n = py::ssize_t(py::len(params));
  const py::sequence grads = list_arg(op, "grads", grads_obj, n);
  const py::sequence ms = list_arg(op, "exp_avgs", m_obj, n);
  const py::sequence vs = list_arg(op, "exp_avg_sqs", v_obj, n);
  const py::sequence steps = list_arg(op, "steps", steps_obj, n);
  std::vector<StepEntry> entries;
  entries.reserve(size_t(n));
  for (size_t i = 0; i < size_t(n); ++i) {
    const std::string names[4] = {entry_name("params", i), entry_name("grads", i),
                                  entry_name("exp_avgs", i), entry_name("exp_avg_sqs", i)};
    const py::handle st = steps[i];
    if (!PyLong_Check(st.ptr()) || PyBool_Check(st.ptr())) {
      throw py::type_error(std::string(op) + ": " + entry_name("steps", i) +
                           " must be an int, got " +
                           py::str(py::type::of(st).attr("__name__")).cast<std::string>());
    }
    const int64_t step = st.cast<int64_t>();
    check_step_count(op, entry_name("steps", i), step);
    require_state(op, names[2], ms[i]);
    require_state(op, names[3], vs[i]);
    entries.push_back(step_entry(op, names, params[i], grads[i], ms[i], vs[i]));
    entries.back().step = step;
  }
  py::gil_scoped_release release;
  for (const StepEntry& e : entries) run_adam(e, lr, beta1, beta2, eps, weight_decay, decoupled);
}

// --- ISA selection -------------------------------------------------------------------

bool py_select_isa(const std::string& name) {
  if (name != "baseline" && name != "avx2" && name != "avx512" && name != "best") {
    throw py::value_error("select_isa: name must be 'baseline', 'avx2', 'avx512' or 'best', got '" +
                          name + "'");
  }
  return fastnn::select_isa(name.c_str());
}

// Applies FASTNN_ISA; returns a warning message when it could not be honoured.
std::optional<std::string> apply_env_isa() {
  const char* env = std::getenv("FASTNN_ISA");
  if (env == nullptr || env[0] == '\0') return std::nullopt;
  const std::string name(env);
  const bool known = name == "baseline" || name == "avx2" || name == "avx512" || name == "best";
  if (known && fastnn::select_isa(env)) return std::nullopt;
  fastnn::select_isa("best");
  std::string why = known ? "is not supported by this CPU/OS (supported: " +
                                std::string(fastnn::supported_isas()) + ")"
                          : "is not one of baseline, avx2, avx512";
  return "FASTNN_ISA=" + name + " " + why + "; using " + fastnn::active_isa();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() =
      "fastnn's C++ CPU kernels (float32/float64, NCHW/OIHW, C-contiguous NumPy arrays). "
      "Use fastnn.functional; this module does strict checks but no conversion.";
  m.attr("__version__") = FASTNN_VERSION;
  const auto warn = apply_env_isa();
  m.attr("_isa_warning") = warn ? py::object(py::str(*warn)) : py::object(py::none());

  m.def("get_num_threads", &fastnn::get_num_threads, "Threads the kernels use.");
  m.def(
      "set_num_threads",
      [](int n) {
        if (n < 1) throw py::value_error("set_num_threads: n must be >= 1, got " + std::to_string(n));
        fastnn::set_num_threads(n);
      },
      py::arg("n"), "Set the number of threads the kernels use.");
  m.def("park_threads", &fastnn::park_workers,
        "Idle worker threads stop polling for the next kernel and sleep now.");
  m.def("active_isa", [] { return std::string(fastnn::active_isa()); },
        "The ISA whose kernels run now: 'avx512', 'avx2' or 'baseline'.");
  m.def(
      "supported_isas",
      [] {
        std::vector<std::string> out;
        std::string s = fastnn::supported_isas();
        size_t start = 0;
        while (start <= s.size()) {
          const size_t end = s.find(',', start);
          out.push_back(s.substr(start, end == std::string::npos ? std::string::npos : end - start));
          if (end == std::string::npos) break;
          start = end + 1;
        }
        return out;
      },
      "ISAs this CPU and OS can run, best first.");
  m.def("select_isa", &py_select_isa, py::arg("name"),
        "Switch the active ISA ('baseline', 'avx2', 'avx512' or 'best'); returns False, "
        "leaving the selection unchanged, if this CPU/OS cannot run it.");

  init_output_allocator();
  const std::string pool_err = fastnn::pool::env_error();
  m.attr("_memory_pool_warning") = pool_err.empty() ? py::object(py::none()) : py::object(py::str(pool_err));
  m.def(
      "memory_pool_stats",
      [] {
        const fastnn::pool::Stats st = fastnn::pool::stats();
        py::dict d;
        d["hits"] = st.hits;
        d["misses"] = st.misses;
        d["cached_bytes"] = st.cached_bytes;
        d["cached_blocks"] = st.cached_blocks;
        d["in_use_bytes"] = st.in_use_bytes;
        d["in_use_blocks"] = st.in_use_blocks;
        d["limit"] = st.limit;
        d["min_bytes"] = fastnn::pool::kMinBytes;
        d["enabled"] = numpy_set_handler != nullptr && st.limit > 0;
        return d;
      },
      "Counters of the cache that large kernel outputs come from: hits and misses (outputs "
      "served from it or by the system), the free blocks it holds (cached_bytes, "
      "cached_blocks), outputs alive now (in_use_bytes, in_use_blocks), its limit in bytes, the "
      "smallest output that uses it (min_bytes), "
      "and whether outputs use it at all (NumPy >= 1.22).");
  m.def("memory_pool_clear", &fastnn::pool::clear,
        "Return every cached block to the system (outputs still alive are untouched).");
  m.def(
      "set_memory_pool_limit",
      [](int64_t bytes) {
        if (bytes < 0)
          throw py::value_error("set_memory_pool_limit: bytes must be >= 0, got " + std::to_string(bytes));
        fastnn::pool::set_limit(static_cast<size_t>(bytes));
      },
      py::arg("bytes"),
      "Most bytes of freed outputs the cache keeps for reuse; frees any past it. 0 turns it off: "
      "new outputs then come from NumPy's allocator.");

  const std::string cache_err = fastnn::cache_env_error();
  m.attr("_cache_warning") = cache_err.empty()
                                 ? py::object(py::none())
                                 : py::object(py::str("FASTNN_CACHE_SIZES ignored: " + cache_err));
  m.def("cpu_info", &cpu_info_dict,
        "The CPU's vendor, family/model and the cache sizes kernels block for (bytes; l1d and "
        "l2 per core, l3 shared by l3_shared_by CPUs), with how they were found ('cpuid', "
        "'sysfs' or 'default'), the detected sizes and the override in force.");
  m.def("gemm_blocking", &gemm_blocking_dict, py::arg("dtype") = "float32",
        "The active ISA's gemm blocking for dtype: register tile MR x NR and cache blocks KC, "
        "MC, NC (elements), derived from cpu_info()'s cache sizes.");
  m.def("set_cache_sizes", &py_set_cache_sizes, py::arg("spec"),
        "Override the cache sizes kernels block for, like FASTNN_CACHE_SIZES: "
        "'l1d=32K,l2=1M,l3=32M' (any subset; K/M/G suffixes); '' restores the detected ones. "
        "For tests and experiments; ValueError on a malformed spec.");

  m.def("conv2d", &conv2d, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"),
        "x (N,C,H,W), weight (O,C/groups,KH,KW), bias (O,) or None -> y (N,O,OH,OW).");
  m.def("conv2d_backward_input", &conv2d_backward_input, py::arg("grad_out"), py::arg("weight"),
        py::arg("input_hw"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), "grad_out (N,O,OH,OW), weight -> grad_x (N,C,H,W).");
  m.def("conv2d_backward_weight", &conv2d_backward_weight, py::arg("grad_out"), py::arg("x"),
        py::arg("kernel_hw"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), "grad_out (N,O,OH,OW), x (N,C,H,W) -> grad_w (O,C/groups,KH,KW).");
  m.def("matmul", &matmul, py::arg("a"), py::arg("b"), py::arg("transpose_a") = false,
        py::arg("transpose_b") = false,
        "op(a) @ op(b), 2-D or batched 3-D; transpose_a: a stored (K,M); transpose_b: b "
        "stored (N,K).");
  m.def("linear_relu", &linear_relu, py::arg("x"), py::arg("weight"), py::arg("bias"),
        "relu(x @ weight.T + bias): x (M,K), weight (N,K), bias (N,) or None -> (M,N); the bias "
        "and ReLU run in the gemm's epilogue, bit-identical to the separate ops.");
  m.def("linear_relu_backward", &linear_relu_backward, py::arg("grad_out"), py::arg("x"),
        py::arg("weight"), py::arg("y"), py::arg("need_x") = true, py::arg("need_w") = true,
        py::arg("need_b") = true,
        "(grad_x, grad_weight, grad_bias) of linear_relu from grad_out (M,N) and its output y; "
        "each None unless its need_ flag is set.");
  m.def("max_pool2d", &max_pool2d, py::arg("x"), py::arg("kernel_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("out_hw"),
        "x (N,C,H,W) -> y (N,C,OH,OW); out_hw applies ceil_mode. NaN propagates.");
  m.def("max_pool2d_backward", &max_pool2d_backward, py::arg("grad_out"), py::arg("x"),
        py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        "grad_out (N,C,OH,OW), x -> grad_x (N,C,H,W); first maximum (last NaN) wins.");
  m.def("max_pool2d_with_indices", &max_pool2d_with_indices, py::arg("x"),
        py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("out_hw"),
        "x (N,C,H,W) -> (y, indices), both (N,C,OH,OW); indices are int64 flat h*W+w "
        "indices of the first maximum (last NaN) in each input plane, as torch's.");
  m.def("avg_pool2d", &avg_pool2d, py::arg("x"), py::arg("kernel_size"), py::arg("stride"),
        py::arg("padding"), py::arg("out_hw"), py::arg("count_include_pad"),
        py::arg("divisor_override"), "x (N,C,H,W) -> y (N,C,OH,OW), torch's divisor rules.");
  m.def("avg_pool2d_backward", &avg_pool2d_backward, py::arg("grad_out"), py::arg("input_hw"),
        py::arg("kernel_size"), py::arg("stride"), py::arg("padding"),
        py::arg("count_include_pad"), py::arg("divisor_override"),
        "grad_out (N,C,OH,OW) -> grad_x (N,C,H,W).");
  m.def("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("groups"), py::arg("pool_kernel_size"), py::arg("pool_stride"),
        py::arg("pool_padding"), py::arg("pool_dilation"), py::arg("pool_out_hw"),
        py::arg("return_argmax") = false,
        "max_pool2d(relu(conv2d(x, weight, bias))) in one pass, bit-identical to the three "
        "ops; the conv output is never materialised. With return_argmax, (y, argmax): uint8 "
        "(N,O,POH,POW), each pooled output's winning window tap kh*KW+kw, or 255 where no "
        "gradient passes (max <= 0 or NaN).");
  m.def("conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward,
        py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"),
        py::arg("pool_kernel_size"), py::arg("pool_stride"), py::arg("pool_padding"),
        py::arg("pool_dilation"), py::arg("need_x"), py::arg("need_w"), py::arg("need_b"),
        py::arg("argmax") = py::none(),
        "Gradients (grad_x, grad_w, grad_b) of conv2d_relu_max_pool2d (None where not "
        "needed); routed by the forward's argmax when given, else by recomputing the conv "
        "output image by image.");
  m.def("relu", &relu, py::arg("x"), "max(x, 0); NaN stays NaN.");
  m.def("relu_backward", &relu_backward, py::arg("grad_out"), py::arg("y"),
        "grad_out where y > 0, else 0.");
  m.def("softmax_cross_entropy", &softmax_cross_entropy, py::arg("logits"), py::arg("labels"),
        "logits (N,K), labels int64 (N,) -> (mean loss as a 0-d array, (softmax - onehot)/N).");
  m.def("lookup_u8", &lookup_u8, py::arg("images"), py::arg("rows"), py::arg("table"),
        "images uint8 (n, ...), rows int64 (B,) in [0, n) or None (every row), table (256,) "
        "float -> out (B, ...) of table's dtype, out[b] = table[images[rows[b]]].");
  m.def("batch_norm2d", &batch_norm2d, py::arg("x"), py::arg("weight"), py::arg("bias"),
        py::arg("mean"), py::arg("var"), py::arg("eps"), py::arg("training"),
        "x (N,C,H,W); weight, bias (C,) or None -> (y, mean, var). training: mean/var are "
        "None and the batch mean and biased variance over (N,H,W) are computed (in double); "
        "else the given (C,) stats are used. y = (x - mean) / sqrt(var + eps) * weight + bias.");
  m.def("batch_norm2d_backward", &batch_norm2d_backward, py::arg("grad_out"), py::arg("x"),
        py::arg("weight"), py::arg("mean"), py::arg("var"), py::arg("eps"), py::arg("training"),
        py::arg("need_x"), py::arg("need_w"), py::arg("need_b"),
        "(grad_x, grad_weight, grad_bias) of batch_norm2d (None where not needed), with "
        "mean/var as the forward returned them.");
  m.def("batch_norm2d_relu", &batch_norm2d_relu, py::arg("x"), py::arg("weight"),
        py::arg("bias"), py::arg("mean"), py::arg("var"), py::arg("eps"), py::arg("training"),
        "batch_norm2d with the ReLU that follows fused: (max(y, 0), mean, var), y bit for bit "
        "batch_norm2d's.");
  m.def("batch_norm2d_relu_backward", &batch_norm2d_relu_backward, py::arg("grad_out"),
        py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("var"),
        py::arg("eps"), py::arg("training"), py::arg("need_x"), py::arg("need_w"),
        py::arg("need_b"),
        "(grad_x, grad_weight, grad_bias) of batch_norm2d_relu (None where not needed): "
        "grad_out masked where the forward's output is not > 0 (recomputed from x), then "
        "batch_norm2d_backward.");
  m.def("batch_norm2d_relu_max_pool2d", &batch_norm2d_relu_max_pool2d, py::arg("x"),
        py::arg("weight"), py::arg("bias"), py::arg("mean"), py::arg("var"), py::arg("eps"),
        py::arg("training"), py::arg("pool_kernel_size"), py::arg("pool_stride"),
        py::arg("pool_padding"), py::arg("pool_dilation"), py::arg("pool_out_hw"),
        py::arg("return_argmax") = false,
        "max_pool2d(batch_norm2d_relu(x)) -> (y, mean, var[, argmax]) without writing the "
        "(N,C,H,W) BatchNorm output; bit for bit the two ops. argmax: uint8 window codes as "
        "conv2d_relu_max_pool2d's.");
  m.def("batch_norm2d_relu_max_pool2d_backward", &batch_norm2d_relu_max_pool2d_backward,
        py::arg("grad_out"), py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("mean"),
        py::arg("var"), py::arg("eps"), py::arg("training"), py::arg("pool_kernel_size"),
        py::arg("pool_stride"), py::arg("pool_padding"), py::arg("pool_dilation"),
        py::arg("need_x"), py::arg("need_w"), py::arg("need_b"),
        py::arg("argmax") = py::none(),
        "(grad_x, grad_weight, grad_bias) of batch_norm2d_relu_max_pool2d from grad_out "
        "(N,C,POH,POW) (None where not needed); routed by the forward's argmax when given, "
        "else by max_pool2d_backward on the BatchNorm output recomputed from x.");
  m.def("sgd_step", &sgd_step, py::arg("param"), py::arg("grad"), py::arg("momentum_buf"),
        py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"), py::arg("nesterov"),
        "In-place torch.optim.SGD step (dampening 0).");
  m.def("adam_step", &adam_step, py::arg("param"), py::arg("grad"), py::arg("exp_avg"),
        py::arg("exp_avg_sq"), py::arg("step"), py::arg("lr"), py::arg("beta1"),
        py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"), py::arg("decoupled"),
        "In-place torch.optim.Adam (decoupled=False) / AdamW (decoupled=True) step.");
  m.def("sgd_step_multi", &sgd_step_multi, py::arg("params"), py::arg("grads"),
        py::arg("momentum_bufs"), py::arg("lr"), py::arg("momentum"), py::arg("weight_decay"),
        py::arg("nesterov"),
        "sgd_step on each (params[i], grads[i], momentum_bufs[i]) (lists or tuples; "
        "momentum_bufs may be None when momentum == 0): every entry checked before any "
        "update, then all run with the GIL released once.");
  m.def("adam_step_multi", &adam_step_multi, py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("exp_avg_sqs"), py::arg("steps"), py::arg("lr"),
        py::arg("beta1"), py::arg("beta2"), py::arg("eps"), py::arg("weight_decay"),
        py::arg("decoupled"),
        "adam_step on each (params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]) at its own "
        "1-based steps[i] (lists or tuples): every entry checked before any update, then all "
        "run with the GIL released once.");
}
