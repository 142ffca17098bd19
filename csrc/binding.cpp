// pybind11 module gpt2fast._C: the kernels' parameter structs and entry points.
// No PyTorch or CUDA headers: tensors arrive as device pointers (Python ints), strides in
// elements, the CUDA stream as an int.  Each entry point takes one parameter struct whose fields
// Python sets by name (an unknown name raises AttributeError: the classes have no __dict__).
// The Python side (gpt2fast/ops/cuda/) validates everything before calling in here; the entry points
// re-check that the required fields were set and turn CUDA errors into exceptions.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "gpt2fast_api.h"

namespace py = pybind11;
using namespace g2f;

namespace {

constexpr int kCudaErrorInvalidValue = 1;  // cudaErrorInvalidValue (no CUDA headers here)

// A parameter struct as a Python class: default-constructible, one read/write property per field (pointers
// as ints), `FIELDS` (the field names in declaration order) and a __repr__ listing every field.
template <typename S>
class Struct {
 public:
  Struct(py::module_& m, const char* name, const char* doc)
      : cls_(m, name, doc), name_(name), fields_(std::make_shared<std::vector<std::string>>()) {
    cls_.def(py::init<>());
  }

  template <typename D>
  Struct& field(const char* name, D S::*member, const char* doc) {
    cls_.def_readwrite(name, member, doc);
    fields_->push_back(name);
    return *this;
  }

  // A pointer field, read and written as a Python int (the address; 0 = null).
  template <typename P>
  Struct& pointer(const char* name, P* S::*member, const char* doc) {
    cls_.def_property(
        name, [member](const S& s) { return reinterpret_cast<std::uintptr_t>(s.*member); },
        [member](S& s, std::uintptr_t address) { s.*member = reinterpret_cast<P*>(address); }, doc);
    fields_->push_back(name);
    return *this;
  }

  py::class_<S>& done() {
    auto fields = fields_;
    std::string name = name_;
    py::tuple names(fields->size());
    for (size_t i = 0; i < fields->size(); ++i) names[i] = py::str((*fields)[i]);
    cls_.attr("FIELDS") = names;
    cls_.def("__repr__", [fields, name](const py::object& self) {
      std::string out = name + "(";
      for (size_t i = 0; i < fields->size(); ++i) {
        if (i) out += ", ";
        out += (*fields)[i] + "=" + py::repr(self.attr((*fields)[i].c_str())).cast<std::string>();
      }
      return out + ")";
    });
    return cls_;
  }

 private:
  py::class_<S> cls_;
  std::string name_;
  std::shared_ptr<std::vector<std::string>> fields_;
};

// The dtype / stream / device fields every parameter struct has.
template <typename S>
Struct<S>& launch_fields(Struct<S>& s) {
  return s.field("dtype", &S::dtype, "G2F_F32 / F16 / BF16 (_C.F32, _C.F16, _C.BF16); -1 = unset")
      .pointer("stream", &S::stream, "cudaStream_t as an int (0: the legacy default stream)")
      .field("device", &S::device, "CUDA device index of the tensors; -1 = unset");
}

// Raise for a non-zero CUDA error code; invalid values name the struct that carried them.
template <typename S>
void check(int err, const char* op, const S& params) {
  if (err == 0) return;
  std::string msg = std::string("gpt2fast._C.") + op + ": CUDA error " + std::to_string(err) + " (" +
                    error_string(err) + ")";
  if (err == kCudaErrorInvalidValue)
    msg += "; a required field is unset or out of range in " + static_cast<std::string>(py::repr(py::cast(params)));
  throw std::runtime_error(msg);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "gpt2fast CUDA kernels (named parameter structs of device pointers; no PyTorch headers)";
  m.attr("F32") = G2F_F32;
  m.attr("F16") = G2F_F16;
  m.attr("BF16") = G2F_BF16;

  m.def(
      "device_count",
      []() {
        int count = 0;
        const int err = device_count(&count);
        return py::make_tuple(count, err, std::string(err ? error_string(err) : ""));
      },
      "(count, error code, error message) from cudaGetDeviceCount of the extension's own runtime.");

  py::class_<Strides>(m, "Strides", "Element strides (batch, head, time) of one [B, H, (T,) D] operand.")
      .def(py::init([](int64_t batch, int64_t head, int64_t time) {
             Strides s;
             s.batch = batch;
             s.head = head;
             s.time = time;
             return s;
           }),
           py::kw_only(), py::arg("batch") = 0, py::arg("head") = 0, py::arg("time") = 0)
      .def_readwrite("batch", &Strides::batch)
      .def_readwrite("head", &Strides::head)
      .def_readwrite("time", &Strides::time)
      .def("__eq__",
           [](const Strides& a, const Strides& b) { return a.batch == b.batch && a.head == b.head && a.time == b.time; })
      .def("__repr__", [](const Strides& s) {
        return "Strides(batch=" + std::to_string(s.batch) + ", head=" + std::to_string(s.head) +
               ", time=" + std::to_string(s.time) + ")";
      });

  {
    Struct<LayerNormParams> s(m, "LayerNormParams", "Arguments of layer_norm (see csrc/gpt2fast_api.h).");
    launch_fields(s)
        .pointer("x", &LayerNormParams::x, "input rows [rows, n]")
        .field("x_row_stride", &LayerNormParams::x_row_stride, "elements between rows of x")
        .pointer("residual", &LayerNormParams::residual, "added to x before the norm; 0 = none")
        .field("residual_row_stride", &LayerNormParams::residual_row_stride, "elements between rows of residual")
        .pointer("weight", &LayerNormParams::weight, "contiguous [n]")
        .pointer("bias", &LayerNormParams::bias, "contiguous [n]")
        .pointer("y", &LayerNormParams::y, "output, contiguous [rows, n]")
        .pointer("h", &LayerNormParams::h, "x + residual, contiguous [rows, n]; 0 without a residual")
        .field("rows", &LayerNormParams::rows, "number of rows (> 0)")
        .field("n", &LayerNormParams::n, "elements per row (> 0)")
        .field("eps", &LayerNormParams::eps, "variance epsilon (> 0)")
        .done();
  }
  {
    Struct<BiasGeluParams> s(m, "BiasGeluParams", "Arguments of bias_gelu (see csrc/gpt2fast_api.h).");
    launch_fields(s)
        .pointer("x", &BiasGeluParams::x, "input rows [rows, n]")
        .field("x_row_stride", &BiasGeluParams::x_row_stride, "elements between rows of x")
        .pointer("bias", &BiasGeluParams::bias, "contiguous [n]")
        .pointer("y", &BiasGeluParams::y, "output, contiguous [rows, n]")
        .field("rows", &BiasGeluParams::rows, "number of rows (> 0)")
        .field("n", &BiasGeluParams::n, "elements per row (> 0)")
        .done();
  }
  {
    Struct<AttentionParams> s(m, "AttentionParams", "Arguments of attention (see csrc/gpt2fast_api.h).");
    launch_fields(s)
        .pointer("q", &AttentionParams::q, "[B, H, T, D], unit stride in D")
        .field("q_strides", &AttentionParams::q_strides, "(batch, head, time) strides of q")
        .pointer("k", &AttentionParams::k, "[B, H, T, D], unit stride in D")
        .field("k_strides", &AttentionParams::k_strides, "(batch, head, time) strides of k")
        .pointer("v", &AttentionParams::v, "[B, H, T, D], unit stride in D")
        .field("v_strides", &AttentionParams::v_strides, "(batch, head, time) strides of v")
        .pointer("out", &AttentionParams::out, "output, contiguous [B, H, T, D]")
        .field("batch", &AttentionParams::batch, "B (> 0)")
        .field("heads", &AttentionParams::heads, "H (> 0)")
        .field("seqlen", &AttentionParams::seqlen, "T (> 0)")
        .field("head_dim", &AttentionParams::head_dim, "D: 32, 64 or 128")
        .field("causal", &AttentionParams::causal, "mask keys after the query")
        .field("scale", &AttentionParams::scale, "softmax scale (> 0)")
        .done();
  }
  {
    Struct<DecodeAttentionParams> s(m, "DecodeAttentionParams",
                                    "Arguments of decode_attention (see csrc/gpt2fast_api.h).");
    launch_fields(s)
        .pointer("q", &DecodeAttentionParams::q, "[B, H, D], unit stride in D")
        .field("q_strides", &DecodeAttentionParams::q_strides, "(batch, head) strides of q; time = 0")
        .pointer("k_cache", &DecodeAttentionParams::k_cache, "[B, H, T_max, D], written at the append slot")
        .field("k_cache_strides", &DecodeAttentionParams::k_cache_strides, "(batch, head, time) strides")
        .pointer("v_cache", &DecodeAttentionParams::v_cache, "[B, H, T_max, D], written at the append slot")
        .field("v_cache_strides", &DecodeAttentionParams::v_cache_strides, "(batch, head, time) strides")
        .pointer("cache_seqlens", &DecodeAttentionParams::cache_seqlens, "contiguous int32 [B]")
        .pointer("k_new", &DecodeAttentionParams::k_new, "[B, H, D] appended at cache_seqlens[b]; 0 = none")
        .field("k_new_strides", &DecodeAttentionParams::k_new_strides, "(batch, head) strides of k_new")
        .pointer("v_new", &DecodeAttentionParams::v_new, "[B, H, D]; set exactly when k_new is")
        .field("v_new_strides", &DecodeAttentionParams::v_new_strides, "(batch, head) strides of v_new")
        .pointer("out", &DecodeAttentionParams::out, "output, contiguous [B, H, D]")
        .pointer("o_part", &DecodeAttentionParams::o_part, "float [B, H, splits, D]; 0 when num_splits == 1")
        .pointer("lse", &DecodeAttentionParams::lse, "float [B, H, splits]; 0 when num_splits == 1")
        .field("batch", &DecodeAttentionParams::batch, "B (> 0)")
        .field("heads", &DecodeAttentionParams::heads, "H (> 0)")
        .field("t_max", &DecodeAttentionParams::t_max, "cache positions T_max (> 0)")
        .field("head_dim", &DecodeAttentionParams::head_dim, "D: 32, 64 or 128")
        .field("num_splits", &DecodeAttentionParams::num_splits, "KV splits, 1..T_max")
        .field("scale", &DecodeAttentionParams::scale, "softmax scale (> 0)")
        .done();
  }

  m.def(
      "layer_norm", [](const LayerNormParams& p) { check(layer_norm(p), "layer_norm", p); }, py::arg("params"),
      "LayerNorm(+residual) over rows.");
  m.def(
      "bias_gelu", [](const BiasGeluParams& p) { check(bias_gelu(p), "bias_gelu", p); }, py::arg("params"),
      "gelu_tanh(x + bias) over rows.");
  m.def(
      "attention", [](const AttentionParams& p) { check(attention(p), "attention", p); }, py::arg("params"),
      "Flash attention over [B, H, T, D].");
  m.def(
      "decode_attention", [](const DecodeAttentionParams& p) { check(decode_attention(p), "decode_attention", p); },
      py::arg("params"), "Split-KV decode attention with in-place append.");
}
