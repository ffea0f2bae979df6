// fastcl._cuda: pybind11 bindings of the CUDA kernels. Tensors arrive as raw device
// addresses (tensor.data_ptr()) with sizes, dtype codes, the device index and the CUDA
// stream handle (torch.cuda.current_stream().cuda_stream), so this module never links
// libtorch; fastcl/kernels/cuda.py validates the tensors and allocates scratch space.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels.h"

namespace py = pybind11;

namespace {

void check_len(const char* name, size_t got, size_t want) {
    if (got != want)
        throw std::invalid_argument(std::string("penalty: ") + name + " has " + std::to_string(got) +
                                    " addresses, expected " + std::to_string(want));
}

template <class T>
std::vector<T> as_ptrs(const std::vector<uintptr_t>& addrs) {
    std::vector<T> out(addrs.size());
    for (size_t i = 0; i < addrs.size(); ++i) out[i] = reinterpret_cast<T>(addrs[i]);
    return out;
}

int64_t penalty_num_partials(const std::vector<int64_t>& sizes) {
    return fastcl_cuda_penalty_num_partials(int64_t(sizes.size()), sizes.data());
}

void penalty(const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& anchors,
             const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& grads,
             const std::vector<int64_t>& sizes, int param_dtype, int anchor_dtype, int weight_dtype, int kind,
             double scale, uintptr_t partials, int64_t num_partials, uintptr_t out, int device, uintptr_t stream) {
    const size_t n = sizes.size();
    check_len("params", params.size(), n);
    check_len("anchors", anchors.size(), n);
    if (!weights.empty()) check_len("weights", weights.size(), n);
    if (!grads.empty()) check_len("grads", grads.size(), n);
    const auto p = as_ptrs<const void*>(params), a = as_ptrs<const void*>(anchors), w = as_ptrs<const void*>(weights);
    const auto g = as_ptrs<void*>(grads);
    int code;
    {
        py::gil_scoped_release no_gil;
        code = fastcl_cuda_penalty(int64_t(n), p.data(), a.data(), weights.empty() ? nullptr : w.data(),
                                   grads.empty() ? nullptr : g.data(), sizes.data(), param_dtype, anchor_dtype,
                                   weights.empty() ? -1 : weight_dtype, kind, scale, reinterpret_cast<float*>(partials),
                                   num_partials, reinterpret_cast<float*>(out), device, reinterpret_cast<void*>(stream));
    }
    if (code != 0)
        throw std::runtime_error(std::string("fastcl._cuda.penalty failed: ") + fastcl_cuda_error_string(code) +
                                 " (code " + std::to_string(code) + ")");
}

int device_count() {
    int count = 0;
    const int code = fastcl_cuda_device_count(&count);
    if (code != 0)
        throw std::runtime_error(std::string("CUDA runtime of fastcl._cuda cannot start: ") + fastcl_cuda_error_string(code) +
                                 " (code " + std::to_string(code) + ")");
    return count;
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
    m.doc() = "fastcl CUDA kernels (raw-pointer interface; use fastcl.kernels.cuda, not this module)";
    m.attr("PENALTY_CHUNK") = fastcl_cuda_penalty_chunk;
    m.def("device_count", &device_count,
          "CUDA devices visible to this extension's runtime; raises RuntimeError if it cannot start (e.g. old driver).");
    m.def("penalty_num_partials", &penalty_num_partials, py::arg("sizes"),
          "Length of the float32 scratch buffer penalty() needs for these tensor sizes.");
    m.def("penalty", &penalty, py::arg("params"), py::arg("anchors"), py::arg("weights"), py::arg("grads"),
          py::arg("sizes"), py::arg("param_dtype"), py::arg("anchor_dtype"), py::arg("weight_dtype"), py::arg("kind"),
          py::arg("scale"), py::arg("partials"), py::arg("num_partials"), py::arg("out"), py::arg("device"),
          py::arg("stream"),
          "out[0] = scale·Σ w·φ(θ−a) over all tensors (φ = d²/2 for kind 0, |d| for kind 1); with grads, also "
          "grads += scale·w·φ'(θ−a); asynchronous on `stream`. Device addresses as ints; empty weights = w 1; "
          "empty grads = value only. Dtype codes: 0 float32, 1 bfloat16, 2 float16.");
}
