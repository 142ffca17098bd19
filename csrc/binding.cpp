// pybind11 module gpt2fast._C: thin wrappers over the kernels' host entry points.
// No PyTorch or CUDA headers: tensors arrive as device pointers (Python ints), strides in
// elements, the CUDA stream as an int.  The Python side (gpt2fast/ops/cuda.py) validates
// everything before calling in here; these functions only turn CUDA errors into exceptions.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "gpt2fast_api.h"

namespace py = pybind11;

namespace {

void* ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void check(int err, const char* op) {
  if (err != 0)
    throw std::runtime_error(std::string("gpt2fast._C.") + op + ": CUDA error " + std::to_string(err) + " (" +
                             g2f::error_string(err) + ")");
}

const int64_t* strides(const std::vector<int64_t>& s, size_t n, const char* what) {
  if (s.size() != n) throw std::invalid_argument(std::string(what) + " must have " + std::to_string(n) + " strides");
  return s.data();
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gpt2fast CUDA kernels (device pointers in, no PyTorch headers)";
  m.attr("F32") = G2F_F32;
  m.attr("F16") = G2F_F16;
  m.attr("BF16") = G2F_BF16;

  m.def(
      "device_count",
      []() {
        int count = 0;
        const int err = g2f::device_count(&count);
        return py::make_tuple(count, err, std::string(err ? g2f::error_string(err) : ""));
      },
      "(count, error code, error message) from cudaGetDeviceCount of the extension's own runtime.");

  m.def(
      "layer_norm",
      [](int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t residual, int64_t res_stride,
         std::uintptr_t weight, std::uintptr_t bias, std::uintptr_t y, std::uintptr_t h, int64_t rows, int64_t n,
         float eps, std::uintptr_t stream, int device) {
        check(g2f::layer_norm(dtype, ptr(x), x_stride, ptr(residual), res_stride, ptr(weight), ptr(bias), ptr(y),
                              ptr(h), rows, n, eps, ptr(stream), device),
              "layer_norm");
      },
      "LayerNorm(+residual) over rows; residual/h = 0 for none.");

  m.def(
      "bias_gelu",
      [](int dtype, std::uintptr_t x, int64_t x_stride, std::uintptr_t bias, std::uintptr_t y, int64_t rows,
         int64_t n, std::uintptr_t stream, int device) {
        check(g2f::bias_gelu(dtype, ptr(x), x_stride, ptr(bias), ptr(y), rows, n, ptr(stream), device), "bias_gelu");
      },
      "gelu_tanh(x + bias) over rows.");

  m.def(
      "attention",
      [](int dtype, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::uintptr_t out, int batch, int heads,
         int seqlen, int head_dim, const std::vector<int64_t>& q_strides, const std::vector<int64_t>& k_strides,
         const std::vector<int64_t>& v_strides, bool causal, float scale, std::uintptr_t stream, int device) {
        check(g2f::attention(dtype, ptr(q), ptr(k), ptr(v), ptr(out), batch, heads, seqlen, head_dim,
                             strides(q_strides, 3, "q_strides"), strides(k_strides, 3, "k_strides"),
                             strides(v_strides, 3, "v_strides"), causal, scale, ptr(stream), device),
              "attention");
      },
      "Flash attention over [B, H, T, D]; strides are (batch, head, time).");

  m.def(
      "decode_attention",
      [](int dtype, std::uintptr_t q, const std::vector<int64_t>& q_strides, std::uintptr_t k_cache,
         std::uintptr_t v_cache, const std::vector<int64_t>& kc_strides, const std::vector<int64_t>& vc_strides,
         std::uintptr_t cache_seqlens, std::uintptr_t k_new, std::uintptr_t v_new,
         const std::vector<int64_t>& knew_strides, const std::vector<int64_t>& vnew_strides, std::uintptr_t out,
         std::uintptr_t o_part, std::uintptr_t lse, int batch, int heads, int t_max, int head_dim, int num_splits,
         float scale, std::uintptr_t stream, int device) {
        check(g2f::decode_attention(dtype, ptr(q), strides(q_strides, 2, "q_strides"), ptr(k_cache), ptr(v_cache),
                                    strides(kc_strides, 3, "kc_strides"), strides(vc_strides, 3, "vc_strides"),
                                    static_cast<const int32_t*>(ptr(cache_seqlens)), ptr(k_new), ptr(v_new),
                                    strides(knew_strides, 2, "knew_strides"), strides(vnew_strides, 2, "vnew_strides"),
                                    ptr(out), static_cast<float*>(ptr(o_part)), static_cast<float*>(ptr(lse)), batch,
                                    heads, t_max, head_dim, num_splits, scale, ptr(stream), device),
              "decode_attention");
      },
      "Split-KV decode attention with in-place append; o_part/lse = 0 when num_splits == 1.");
}
