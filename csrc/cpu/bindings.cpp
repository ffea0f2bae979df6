// fastcl._C: pybind11 bindings of the CPU kernels. Tensors arrive as raw addresses
// (tensor.data_ptr()) with sizes and dtype codes, so this module never links libtorch;
// fastcl/kernels/cpp.py validates the tensors before calling in.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtypes.h"
#include "kernels.h"

namespace py = pybind11;

namespace {

std::vector<const void*> as_const_ptrs(const std::vector<uintptr_t>& addrs) {
    std::vector<const void*> out(addrs.size());
    for (size_t i = 0; i < addrs.size(); ++i) out[i] = reinterpret_cast<const void*>(addrs[i]);
    return out;
}

std::vector<void*> as_ptrs(const std::vector<uintptr_t>& addrs) {
    std::vector<void*> out(addrs.size());
    for (size_t i = 0; i < addrs.size(); ++i) out[i] = reinterpret_cast<void*>(addrs[i]);
    return out;
}

void check_len(const char* name, size_t got, size_t want) {
    if (got != want)
        throw std::invalid_argument(std::string("penalty: ") + name + " has " + std::to_string(got) +
                                    " addresses, expected " + std::to_string(want));
}

double penalty(const std::vector<uintptr_t>& params, const std::vector<uintptr_t>& anchors,
               const std::vector<uintptr_t>& weights, const std::vector<uintptr_t>& grads,
               const std::vector<int64_t>& sizes, int param_dtype, int anchor_dtype, int weight_dtype,
               int form, int grad_mode, double scale, int num_threads) {
    const size_t n = sizes.size();
    check_len("params", params.size(), n);
    check_len("anchors", anchors.size(), n);
    if (!weights.empty()) check_len("weights", weights.size(), n);
    if (grad_mode != fastcl::kValueOnly) check_len("grads", grads.size(), n);
    const auto p = as_const_ptrs(params), a = as_const_ptrs(anchors), w = as_const_ptrs(weights);
    const auto g = as_ptrs(grads);
    py::gil_scoped_release no_gil;
    return fastcl::penalty_cpu(int64_t(n), p.data(), a.data(), weights.empty() ? nullptr : w.data(),
                               grads.empty() ? nullptr : g.data(), sizes.data(), param_dtype, anchor_dtype,
                               weights.empty() ? fastcl::kNone : weight_dtype, form, grad_mode, scale, num_threads);
}

void distill(uintptr_t student, uintptr_t teacher, uintptr_t mask, uintptr_t row_loss, uintptr_t grad,
             int64_t rows, int64_t vocab, int dtype, double temperature, double grad_scale, int num_threads, int isa) {
    py::gil_scoped_release no_gil;
    fastcl::distill_cpu(reinterpret_cast<const void*>(student), reinterpret_cast<const void*>(teacher),
                        reinterpret_cast<const uint8_t*>(mask), reinterpret_cast<float*>(row_loss),
                        reinterpret_cast<void*>(grad), rows, vocab, dtype, temperature, grad_scale, num_threads,
                        isa);
}

void sqgrad(uintptr_t x, uintptr_t g, uintptr_t out, int64_t B, int64_t T, int64_t I, int64_t O,
            const std::vector<int64_t>& x_strides, const std::vector<int64_t>& g_strides, int dtype, int power,
            int num_threads, int isa) {
    if (x_strides.size() != 3 || g_strides.size() != 3) throw std::invalid_argument("sqgrad: strides must have 3 entries");
    if (power != 1 && power != 2) throw std::invalid_argument("sqgrad: power must be 1 or 2");
    py::gil_scoped_release no_gil;
    fastcl::sqgrad_cpu(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(g), reinterpret_cast<float*>(out),
                       B, T, I, O, x_strides.data(), g_strides.data(), dtype, power, num_threads, isa);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "fastcl CPU kernels (raw-pointer interface; use fastcl.kernels.cpp, not this module)";
    m.attr("PENALTY_CHUNK") = fastcl::kPenaltyChunk;
    m.def("penalty", &penalty, py::arg("params"), py::arg("anchors"), py::arg("weights"), py::arg("grads"),
          py::arg("sizes"), py::arg("param_dtype"), py::arg("anchor_dtype"), py::arg("weight_dtype"),
          py::arg("form"), py::arg("grad_mode"), py::arg("scale"), py::arg("num_threads"),
          "scale·Σ w·φ(θ−a) over all tensors (φ = d²/2 for form 0, |d| for form 1); grad_mode 1: also "
          "grads += scale·w·φ'(θ−a), 2: grads = scale·w·φ'(θ−a) (grads not read), 0: value only. Addresses "
          "as ints; empty weights = w 1. Codes: csrc/common/codes.h (dtypes 0 float32, 1 bfloat16, 2 float16).");
    m.def("distill", &distill, py::arg("student"), py::arg("teacher"), py::arg("mask"), py::arg("row_loss"),
          py::arg("grad"), py::arg("rows"), py::arg("vocab"), py::arg("dtype"), py::arg("temperature"),
          py::arg("grad_scale"), py::arg("num_threads"), py::arg("isa") = -1,
          "Per row: row_loss = T²·KL(softmax(t/T) ‖ softmax(s/T)) (float32, unscaled), grad = grad_scale·T·"
          "(softmax(s/T) − softmax(t/T)) in the logits' dtype; mask address 0 = no mask, else uint8 per row. isa: -1 = the widest "
          "variant this CPU supports, else 0 baseline, 1 avx2, 2 avx512 (for tests).");
    m.def("sqgrad", &sqgrad, py::arg("x"), py::arg("g"), py::arg("out"), py::arg("B"), py::arg("T"), py::arg("I"),
          py::arg("O"), py::arg("x_strides"), py::arg("g_strides"), py::arg("dtype"), py::arg("power"),
          py::arg("num_threads"), py::arg("isa") = -1,
          "out[o, i] += Σ_b |Σ_t g[b,t,o]·x[b,t,i]|^power into float32 out [O, I]; x [B, T, I], g [B, T, O] "
          "with element strides; power 2 or 1; dtype codes as for penalty; isa as for distill.");
    m.def("distill_isa", [] {
        static const char* names[] = {"baseline", "avx2", "avx512"};
        return std::string(names[fastcl::distill_isa()]);
    }, "Instruction set of the distill kernel variant chosen for this CPU: baseline, avx2 or avx512.");
}
