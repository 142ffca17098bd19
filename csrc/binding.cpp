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
#include <type_traits>
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

  // One read/write property; a pointer field is read and written as a Python int (the address; 0 = null).
  template <typename D>
  Struct& field(const char* name, D S::*member, const char* doc) {
    if constexpr (std::is_pointer_v<D>) {
      cls_.def_property(
          name, [member](const S& s) { return reinterpret_cast<std::uintptr_t>(s.*member); },
          [member](S& s, std::uintptr_t address) { s.*member = reinterpret_cast<D>(address); }, doc);
    } else {
      cls_.def_readwrite(name, member, doc);
    }
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

// One Struct::field call per X(type, name, default, doc) row of a G2F_*_FIELDS list (gpt2fast_api.h).
#define G2F_BIND_FIELD(type, name, init, doc) .field(#name, &S::name, doc)

// The Python class of parameter struct NAME (the launch fields, then FIELDS, in declaration order) and
// the entry point OP(params) taking it, documented as DOC.
#define G2F_BIND_OP(m, OP, NAME, FIELDS, DOC)                                   \
  do {                                                                          \
    using S = NAME;                                                             \
    Struct<S> s(m, #NAME, "Arguments of " #OP " (see csrc/gpt2fast_api.h).");   \
    s G2F_LAUNCH_FIELDS(G2F_BIND_FIELD) FIELDS(G2F_BIND_FIELD);                 \
    s.done();                                                                   \
    m.def(                                                                      \
        #OP, [](const S& p) { check(OP(p), #OP, p); }, py::arg("params"), DOC); \
  } while (0)

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

  G2F_BIND_OP(m, layer_norm, LayerNormParams, G2F_LAYER_NORM_FIELDS, "LayerNorm(+residual) over rows.");
  G2F_BIND_OP(m, bias_gelu, BiasGeluParams, G2F_BIAS_GELU_FIELDS, "gelu_tanh(x + bias) over rows.");
  G2F_BIND_OP(m, layer_norm_backward, LayerNormBackwardParams, G2F_LAYER_NORM_BACKWARD_FIELDS,
              "Backward of LayerNorm(+residual): dh, dweight, dbias.");
  G2F_BIND_OP(m, bias_gelu_backward, BiasGeluBackwardParams, G2F_BIAS_GELU_BACKWARD_FIELDS,
              "Backward of gelu_tanh(x + bias): dx, dbias.");
  G2F_BIND_OP(m, attention, AttentionParams, G2F_ATTENTION_FIELDS, "Flash attention over [B, H, T, D].");
  G2F_BIND_OP(m, decode_attention, DecodeAttentionParams, G2F_DECODE_ATTENTION_FIELDS,
              "Split-KV decode attention with in-place append.");
}
