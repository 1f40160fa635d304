// The Python module ash_ext._C of the real build: importing it loads the library, whose static
// initialisers register the ops, and it carries the backends' switches and reports and the public
// functions' fast path (shape). The op front end (ops.cpp) does not depend on it, so other builds
// (the CUDA emulation) link without it.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <optional>

#include "cpu/cpu_common.h"
#include "cuda/launch_plan.h"

namespace {

// ---------------------------------------------------------------------------------------------
// shape(x, percentile, variant, clip, inplace): the public functions' fast path
// ---------------------------------------------------------------------------------------------
//
// ash_ext.ash_p(x, 0.65) and its siblings spend far longer in Python than in the kernel on a
// small input: the checks, k, torch.ops' argument parsing and, under no_grad, the autograd key's
// Python kernel (register_autograd), which only redispatches below autograd. This entry point
// serves the plain eager call -- an ordinary tensor, a float percentile, at most a float clip --
// with one C++ call, and returns None for everything else, which then takes the general path
// (ash_ext.functional.shape_with: the checks, their messages, the fallback, autograd). So it
// checks nothing a user is told about; it only decides whether a call is plain enough:
//   * x is a torch.Tensor (or a Parameter), not a subclass, of a supported dtype and rank >= 2,
//     a strided tensor on the CPU (or on CUDA where the CUDA kernels are built) with no
//     functorch, functionalization or other wrapper keys;
//   * no TorchFunctionMode and no TorchDispatchMode, functorch transform, pre-dispatch tracer,
//     JIT tracer or other mode is active (they would see the call differently);
//   * percentile is a float in [0, 1]; clip is None or a float other than NaN;
//   * out of place: x does not require grad or grad mode is off -- the op then runs below the
//     autograd key, as the autograd key's kernel itself would run it; in place: the same
//     condition, else the general path raises the error it must.
// Dynamo never reaches it (functional.py tests is_dynamo_compiling first); the tracers that run
// eagerly (make_fx, non-strict torch.export, AOTAutograd) get None (fake tensors, active modes).

// The ops, looked up once (they are registered by this library's static initialisers).
using OptionalTensor = std::optional<at::Tensor>;
using OptionalBound = std::optional<double>;

const auto& ash_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ash_ext::ash", "").typed<
      at::Tensor(const at::Tensor&, int64_t, int64_t, const OptionalTensor&, OptionalBound, OptionalBound)>();
  return op;
}

const auto& ash_inplace_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("ash_ext::ash_", "").typed<
      void(const at::Tensor&, int64_t, int64_t, const OptionalTensor&, OptionalBound, OptionalBound)>();
  return op;
}

// k = n - round(n * percentile), the product a double rounded half to even: Python's
// int(round(n * percentile)) in ash_ext._semantics.kept_count, whatever the FPU rounding mode.
int64_t kept_count(int64_t n, double percentile) {
  const double product = static_cast<double>(n) * percentile;
  double rounded = std::floor(product);
  const double rest = product - rounded;  // exact
  if (rest > 0.5 || (rest == 0.5 && std::fmod(rounded, 2.0) != 0.0)) {
    rounded += 1.0;
  }
  return n - static_cast<int64_t>(rounded);
}

// Whether the tensor's dispatch keys are those of a plain dense tensor of a device with a kernel.
bool plain_device_keys(const at::Tensor& x) {
  const c10::DispatchKeySet keys =
      x.key_set() - c10::autograd_dispatch_keyset_with_ADInplaceOrView - c10::autocast_dispatch_keyset;
  if (keys == c10::DispatchKeySet(c10::DispatchKey::CPU)) {
    return true;
  }
#ifdef ASH_EXT_WITH_CUDA
  if (keys == c10::DispatchKeySet(c10::DispatchKey::CUDA)) {
    return true;
  }
#endif
  return false;
}

// Whether nothing but the dispatcher's defaults is switched on for this thread.
bool no_active_modes() {
  const c10::DispatchKeySet included = c10::impl::tls_local_dispatch_key_set().included_ -
                                       c10::DispatchKeySet({c10::DispatchKey::BackendSelect,
                                                            c10::DispatchKey::ADInplaceOrView});
  return included.empty() && !at::impl::torch_function_mode_enabled();
}

// Values per sample, or -1 where that is above 2^53 (k's double product would not be exact).
int64_t plain_sample_size(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t d = 1; d < x.dim(); ++d) {
    if (__builtin_mul_overflow(n, x.size(d), &n) || n > (int64_t(1) << 53)) {
      return -1;
    }
  }
  return n;
}

// Releases the GIL for the op (as torch.ops does); a Python kernel reached below takes it back.
struct GilRelease {
  PyThreadState* state = PyEval_SaveThread();
  GilRelease() = default;
  GilRelease(const GilRelease&) = delete;
  GilRelease& operator=(const GilRelease&) = delete;
  ~GilRelease() { PyEval_RestoreThread(state); }
};

PyObject* shape(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  if (nargs != 5) {
    PyErr_Format(PyExc_TypeError, "shape(x, percentile, variant, clip, inplace) takes 5 arguments, got %zd", nargs);
    return nullptr;
  }
  PyObject* py_x = args[0];
  PyObject* py_percentile = args[1];
  PyObject* py_clip = args[3];
  if (!THPVariable_CheckExact(py_x) || !PyFloat_CheckExact(py_percentile)) {
    Py_RETURN_NONE;
  }
  const double percentile = PyFloat_AS_DOUBLE(py_percentile);
  if (!(percentile >= 0.0 && percentile <= 1.0)) {  // NaN fails too
    Py_RETURN_NONE;
  }
  OptionalBound clamp_max;
  if (py_clip != Py_None) {
    if (!PyFloat_CheckExact(py_clip) || std::isnan(PyFloat_AS_DOUBLE(py_clip))) {
      Py_RETURN_NONE;
    }
    clamp_max = PyFloat_AS_DOUBLE(py_clip);
  }
  const long variant = PyLong_AsLong(args[2]);
  if (variant < 0 || variant >= ash_ext::kVariantCount) {
    if (PyErr_Occurred()) {
      return nullptr;
    }
    Py_RETURN_NONE;
  }
  const int inplace = PyObject_IsTrue(args[4]);
  if (inplace < 0) {
    return nullptr;
  }
  const at::Tensor& x = THPVariable_Unpack(py_x);
  const auto dtype = x.scalar_type();
  if (x.dim() < 2 ||
      !(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16) ||
      !plain_device_keys(x) || !no_active_modes() || (x.requires_grad() && c10::GradMode::is_enabled())) {
    Py_RETURN_NONE;
  }
  const int64_t n = plain_sample_size(x);
  if (n < 0) {
    Py_RETURN_NONE;
  }
  const int64_t k = kept_count(n, percentile);
  if (inplace) {
    {
      // Through every dispatch key, as torch.ops.ash_ext.ash_ would go (ash_ has no autograd
      // kernel: the autograd key's fallback runs, below it the backend's).
      const GilRelease no_gil;
      ash_inplace_op().call(x, k, variant, std::nullopt, std::nullopt, clamp_max);
    }
    Py_INCREF(py_x);
    return py_x;
  }
  at::Tensor out;
  {
    const GilRelease no_gil;
    const at::AutoDispatchBelowAutograd below_autograd;
    out = ash_op().call(x, k, variant, std::nullopt, std::nullopt, clamp_max);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* compiled_with_cuda(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef ASH_EXT_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

// The CPU kernel's ISA builds by name: cpu_isa() -> the one that runs; cpu_isas() -> those this
// CPU and build support, best last; set_cpu_isa(name) -> the previous one's name.
PyObject* cpu_isa(PyObject* /*self*/, PyObject* /*args*/) {
  return PyUnicode_FromString(ash_ext::cpu_isa_name(ash_ext::cpu_isa()));
}

PyObject* cpu_isas(PyObject* /*self*/, PyObject* /*args*/) {
  PyObject* names = PyList_New(0);
  for (int level = 0; names != nullptr && level < ash_ext::kCpuIsaCount; ++level) {
    const auto isa = static_cast<ash_ext::CpuIsa>(level);
    if (ash_ext::cpu_isa_supported(isa)) {
      PyObject* name = PyUnicode_FromString(ash_ext::cpu_isa_name(isa));
      if (name == nullptr || PyList_Append(names, name) != 0) {
        Py_XDECREF(name);
        Py_DECREF(names);
        return nullptr;
      }
      Py_DECREF(name);
    }
  }
  return names;
}

PyObject* set_cpu_isa(PyObject* /*self*/, PyObject* arg) {
  const char* name = PyUnicode_AsUTF8(arg);
  if (name == nullptr) {
    return nullptr;
  }
  for (int level = 0; level < ash_ext::kCpuIsaCount; ++level) {
    const auto isa = static_cast<ash_ext::CpuIsa>(level);
    if (std::strcmp(name, ash_ext::cpu_isa_name(isa)) == 0) {
      try {
        return PyUnicode_FromString(ash_ext::cpu_isa_name(ash_ext::set_cpu_isa(isa)));
      } catch (const std::exception& error) {
        PyErr_SetString(PyExc_ValueError, error.what());
        return nullptr;
      }
    }
  }
  PyErr_Format(PyExc_ValueError, "unknown CPU ISA %R: expected baseline, avx2 or avx512", arg);
  return nullptr;
}

// cuda_launch_plan(batch, n, element_bytes, sm_count, shared_optin, max_cluster_blocks=0,
// regime="auto", variant=2, backward=False, clamped=False, per_sample_k=False, stats=False)
// -> dict: the CUDA backend's plan for a shape on a device with those limits, and what it costs
// (launches; tensor bytes read and written when no sample ties at its threshold, and when every
// sample does; a bound on the other, O(batch), bytes). Host code; no GPU needed.
PyObject* cuda_launch_plan(PyObject* /*self*/, PyObject* args, PyObject* kwargs) {
  static const char* keywords[] = {"batch", "n", "element_bytes", "sm_count", "shared_optin", "max_cluster_blocks",
                                   "regime", "variant", "backward", "clamped", "per_sample_k", "stats", nullptr};
  long long batch = 0, n = 0, element_bytes = 0, sm_count = 0, shared_optin = 0, max_cluster = 0, variant = 2;
  const char* regime = "auto";
  int backward = 0, clamped = 0, per_sample_k = 0, stats = 0;
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLLLL|LsLpppp", const_cast<char**>(keywords), &batch, &n,
                                   &element_bytes, &sm_count, &shared_optin, &max_cluster, &regime, &variant,
                                   &backward, &clamped, &per_sample_k, &stats)) {
    return nullptr;
  }
  if (batch < 1 || n < 1 || element_bytes < 1 || sm_count < 1 || shared_optin < 1 || max_cluster < 0) {
    PyErr_Format(PyExc_ValueError,
                 "cuda_launch_plan needs positive arguments, got batch=%lld n=%lld element_bytes=%lld "
                 "sm_count=%lld shared_optin=%lld max_cluster_blocks=%lld",
                 batch, n, element_bytes, sm_count, shared_optin, max_cluster);
    return nullptr;
  }
  if (variant < 0 || variant >= ash_ext::kVariantCount) {
    PyErr_Format(PyExc_ValueError, "cuda_launch_plan: unknown variant code %lld", variant);
    return nullptr;
  }
  namespace cd = ash_ext::cuda_detail;
  const cd::DeviceLimits limits{sm_count, shared_optin, max_cluster};
  cd::LaunchPlan plan{};
  cd::PlannedTraffic untied{}, tied{};
  try {
    plan = cd::plan_launch(batch, n, element_bytes, limits, cd::parse_regime_request(regime));
    const cd::PlannedWork work{static_cast<ash_ext::Variant>(variant), backward != 0, clamped != 0, per_sample_k != 0,
                               stats != 0};
    untied = cd::planned_traffic(plan, n, element_bytes, work, cd::SampleCounts{batch, 0, 0, 0});
    tied = cd::planned_traffic(plan, n, element_bytes, work, cd::SampleCounts{batch, batch, 0, 0});
  } catch (const c10::Error& error) {
    PyErr_SetString(PyExc_ValueError, error.what_without_backtrace());  // the planner's message alone
    return nullptr;
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
  int64_t grid = batch < INT_MAX ? batch : INT_MAX;  // regimes 1 and 2 loop over the samples beyond
  int64_t cluster_blocks = 0;
  if (plan.regime == cd::Regime::kChunked) {
    grid = batch * plan.chunks;
  } else if (plan.regime == cd::Regime::kCluster) {
    grid = batch * plan.chunks;
    cluster_blocks = plan.chunks;
  }
  return Py_BuildValue(
      "{s:s,s:i,s:n,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:n,s:n}", "regime", cd::regime_name(plan.regime),
      "threads", plan.threads, "dynamic_shared", static_cast<Py_ssize_t>(plan.shared_bytes), "chunk_len",
      static_cast<long long>(plan.chunk_len), "chunks", static_cast<long long>(plan.chunks), "grid",
      static_cast<long long>(grid), "cluster_blocks", static_cast<long long>(cluster_blocks), "launches",
      static_cast<long long>(untied.launches), "bytes_read", static_cast<long long>(untied.bytes_read),
      "bytes_written", static_cast<long long>(untied.bytes_written), "bytes_read_tied",
      static_cast<long long>(tied.bytes_read), "bytes_written_tied", static_cast<long long>(tied.bytes_written),
      "small_bytes", static_cast<long long>(tied.small_bytes), "dynamic_shared_limit",
      static_cast<Py_ssize_t>(cd::max_dynamic_shared_bytes(limits)), "static_shared_allowance",
      static_cast<Py_ssize_t>(cd::kStaticSharedAllowance));
}

PyMethodDef module_methods[] = {
    {"shape", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(shape)), METH_FASTCALL,
     "shape(x, percentile, variant, clip, inplace): the public functions' fast path, or None."},
    {"compiled_with_cuda", compiled_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The ISA build of the CPU kernel that runs."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "The ISA builds of the CPU kernel this CPU can run, best last."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Choose the CPU kernel's ISA build by name; returns the previous one's name."},
    {"cuda_launch_plan", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(cuda_launch_plan)),
     METH_VARARGS | METH_KEYWORDS,
     "cuda_launch_plan(batch, n, element_bytes, sm_count, shared_optin, max_cluster_blocks=0, regime='auto', "
     "variant=2, backward=False, clamped=False, per_sample_k=False, stats=False): the CUDA backend's launch plan "
     "and its launches and global-memory traffic."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "ash_ext's compiled kernels", -1, module_methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
