// fastcl._cuda: pybind11 bindings of the CUDA kernels. Tensors arrive as raw device
// addresses (a device table of tensor.data_ptr() values, see kernels.h) with dtype codes,
// the device index and the CUDA stream handle (torch.cuda.current_stream().cuda_stream),
// so this module never links libtorch; fastcl/kernels/cuda.py validates the tensors,
// builds and caches the table and allocates scratch space.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace py = pybind11;

namespace {

void check(int code, const char* what) {
    if (code != 0)
        throw std::runtime_error(std::string("fastcl._cuda.") + what + " failed: " + fastcl_cuda_error_string(code) +
                                 " (code " + std::to_string(code) + ")");
}

void penalty(uintptr_t table, int64_t num_tensors, int64_t num_chunks, int param_dtype, int anchor_dtype,
             int weight_dtype, int form, int grad_mode, double scale, uintptr_t partials, int64_t max_partials,
             uintptr_t out, int device, uintptr_t stream) {
    int code;
    {
        py::gil_scoped_release no_gil;
        code = fastcl_cuda_penalty(reinterpret_cast<const int64_t*>(table), num_tensors, num_chunks, param_dtype,
                                   anchor_dtype, weight_dtype, form, grad_mode, scale, reinterpret_cast<float*>(partials),
                                   max_partials, reinterpret_cast<float*>(out), device, reinterpret_cast<void*>(stream));
    }
    check(code, "penalty");
}

int device_count() {
    int count = 0;
    const int code = fastcl_cuda_device_count(&count);
    if (code != 0)
        throw std::runtime_error(std::string("CUDA runtime of fastcl._cuda cannot start: ") + fastcl_cuda_error_string(code) +
                                 " (code " + std::to_string(code) + ")");
    return count;
}

int multiprocessor_count(int device) {
    int count = 0;
    check(fastcl_cuda_multiprocessor_count(device, &count), "multiprocessor_count");
    return count;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "fastcl CUDA kernels (raw-pointer interface; use fastcl.kernels.cuda, not this module)";
    m.attr("PENALTY_CHUNK") = fastcl_cuda_penalty_chunk;
    m.def("device_count", &device_count,
          "CUDA devices visible to this extension's runtime; raises RuntimeError if it cannot start (e.g. old driver).");
    m.def("multiprocessor_count", &multiprocessor_count, py::arg("device"), "Streaming multiprocessors of a device.");
    m.def("penalty_max_partials", &fastcl_cuda_penalty_max_partials, py::arg("num_sms"),
          "Length of the float32 scratch buffer penalty() needs on a device with num_sms SMs.");
    m.def("penalty", &penalty, py::arg("table"), py::arg("num_tensors"), py::arg("num_chunks"), py::arg("param_dtype"),
          py::arg("anchor_dtype"), py::arg("weight_dtype"), py::arg("form"), py::arg("grad_mode"), py::arg("scale"),
          py::arg("partials"), py::arg("max_partials"), py::arg("out"), py::arg("device"), py::arg("stream"),
          "out[0] = scale·Σ w·φ(θ−a) over the tensors of a device table (layout in csrc/cuda/kernels.h); grad_mode 1: "
          "grads += scale·w·φ'(θ−a), 2: grads = scale·w·φ'(θ−a), 0: value only. Two launches on `stream`. Device "
          "addresses as ints. Codes: csrc/common/codes.h.");
}
