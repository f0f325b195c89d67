// mixkernels._C_cuda: CUDA kernels register themselves (TORCH_LIBRARY_IMPL(mixkernels_C, CUDA))
// from the *_binding.cpp files; the schemas live in mixkernels._C, which must load first.
#include <Python.h>
static struct PyModuleDef mixkernels_C_cuda_module = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&mixkernels_C_cuda_module); }
