// The Python module ash_ext._C of the real build: importing it loads the library, whose static
// initialisers register the ops, and it carries the backends' switches and reports. The op front
// end (ops.cpp) does not depend on it, so other builds (the CUDA emulation) link without it.
#include <Python.h>

#include <cstdint>
#include <cstring>
#include <exception>

#include "cpu/cpu_common.h"
#include "cuda/launch_plan.h"

namespace {

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

// cuda_launch_plan(batch, n, element_bytes, sm_count, shared_optin) -> dict: the CUDA
// backend's plan for a shape on a device with those limits (host code; no GPU needed).
PyObject* cuda_launch_plan(PyObject* /*self*/, PyObject* args) {
  long long batch = 0, n = 0, element_bytes = 0, sm_count = 0, shared_optin = 0;
  if (!PyArg_ParseTuple(args, "LLLLL", &batch, &n, &element_bytes, &sm_count, &shared_optin)) {
    return nullptr;
  }
  if (batch < 1 || n < 1 || element_bytes < 1 || sm_count < 1 || shared_optin < 1) {
    PyErr_Format(PyExc_ValueError,
                 "cuda_launch_plan needs positive arguments, got batch=%lld n=%lld element_bytes=%lld "
                 "sm_count=%lld shared_optin=%lld",
                 batch, n, element_bytes, sm_count, shared_optin);
    return nullptr;
  }
  namespace cd = ash_ext::cuda_detail;
  const cd::DeviceLimits limits{sm_count, shared_optin};
  cd::LaunchPlan plan{};
  try {
    plan = cd::plan_launch(batch, n, element_bytes, limits);
  } catch (const std::exception& error) {
    PyErr_SetString(PyExc_ValueError, error.what());
    return nullptr;
  }
  static const char* const kRegimes[] = {"on-chip", "block-per-sample", "chunked"};
  return Py_BuildValue("{s:s,s:i,s:n,s:L,s:L,s:n,s:n}", "regime", kRegimes[static_cast<int>(plan.regime)],
                       "threads", plan.threads, "dynamic_shared", static_cast<Py_ssize_t>(plan.shared_bytes),
                       "chunk_len", static_cast<long long>(plan.chunk_len), "chunks",
                       static_cast<long long>(plan.chunks), "dynamic_shared_limit",
                       static_cast<Py_ssize_t>(cd::max_dynamic_shared_bytes(limits)), "static_shared_allowance",
                       static_cast<Py_ssize_t>(cd::kStaticSharedAllowance));
}

PyMethodDef module_methods[] = {
    {"compiled_with_cuda", compiled_with_cuda, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cpu_isa", cpu_isa, METH_NOARGS, "The ISA build of the CPU kernel that runs."},
    {"cpu_isas", cpu_isas, METH_NOARGS, "The ISA builds of the CPU kernel this CPU can run, best last."},
    {"set_cpu_isa", set_cpu_isa, METH_O, "Choose the CPU kernel's ISA build by name; returns the previous one's name."},
    {"cuda_launch_plan", cuda_launch_plan, METH_VARARGS,
     "cuda_launch_plan(batch, n, element_bytes, sm_count, shared_optin): the CUDA backend's launch plan."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {
      PyModuleDef_HEAD_INIT, "_C", "ash_ext's compiled kernels", -1, module_methods, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
