// The Python module object for lossforge._C and lossforge._C_cuda (same file, two extensions).
// It is empty on purpose: importing it loads this shared library, whose static initialisers register
// the ops with torch's dispatcher (torch.ops.lossforge.*). Limited API only, so the wheel is abi3.
#include <Python.h>

#define LF_CONCAT_(a, b) a##b
#define LF_CONCAT(a, b) LF_CONCAT_(a, b)
#define LF_STR_(a) #a
#define LF_STR(a) LF_STR_(a)

extern "C" PyObject* LF_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, LF_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr,
                            nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&def);
}
