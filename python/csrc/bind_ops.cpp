// Bindings of single Backend ops on the CPU backend, for op tests against torch. Arrays in and
// out are float32 (ids int32); weights can be stored as bfloat16 to test that path.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>

#include "engine/backend.h"
#include "kernels/cpu/sampling.h"
#include "models/rope.h"

namespace py = pybind11;
using namespace ftengine;

namespace {

using FloatArray = py::array_t<float, py::array::c_style | py::array::forcecast>;
using IntArray = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

Shape shape_of(const py::array& array) {
  return Shape(array.shape(), array.shape() + array.ndim());
}

class CpuOps {
 public:
  explicit CpuOps(int num_threads) : backend_(make_cpu_backend(num_threads)) {}

  static DType parse_storage(const std::string& name) {
    if (name == "float32") return DType::kFloat32;
    if (name == "bfloat16") return DType::kBFloat16;
    throw std::invalid_argument("storage dtype must be float32 or bfloat16, got " + name);
  }

  FloatArray rmsnorm(const FloatArray& x, const FloatArray& weight, float eps) {
    require(x.ndim() == 2 && weight.ndim() == 1 && weight.shape(0) == x.shape(1),
            "rmsnorm wants x [rows, cols] and weight [cols]");
    Tensor out = backend_->empty(shape_of(x), DType::kFloat32);
    backend_->rmsnorm(in(x), in(weight), eps, out);
    return to_numpy(out);
  }

  FloatArray linear(const FloatArray& x, const FloatArray& weight,
                    const std::optional<FloatArray>& bias, const std::string& weight_dtype) {
    require(x.ndim() == 2 && weight.ndim() == 2 && weight.shape(1) == x.shape(1),
            "linear wants x [rows, in] and weight [out, in]");
    const DType stored = parse_storage(weight_dtype);
    Tensor w = backend_->from_host(weight.data(), shape_of(weight), DType::kFloat32, stored);
    Tensor b;
    if (bias) {
      require(bias->ndim() == 1 && bias->shape(0) == weight.shape(0), "bias must be [out]");
      b = in(*bias);
    }
    Tensor out = backend_->empty({x.shape(0), weight.shape(0)}, DType::kFloat32);
    backend_->linear(in(x), w, bias ? &b : nullptr, out);
    return to_numpy(out);
  }

  FloatArray silu_mul(const FloatArray& gate_up) {
    require(gate_up.ndim() == 2 && gate_up.shape(1) % 2 == 0, "silu_mul wants [rows, 2 * cols]");
    Tensor out = backend_->empty({gate_up.shape(0), gate_up.shape(1) / 2}, DType::kFloat32);
    backend_->silu_mul(in(gate_up), out);
    return to_numpy(out);
  }

  FloatArray embedding(const FloatArray& table, const IntArray& ids, const std::string& dtype,
                       int64_t first_id) {
    require(table.ndim() == 2 && ids.ndim() == 1, "embedding wants table [rows, cols], ids [n]");
    const DType stored = parse_storage(dtype);
    Tensor t = backend_->from_host(table.data(), shape_of(table), DType::kFloat32, stored);
    std::vector<int32_t> id_list(ids.data(), ids.data() + ids.size());
    Tensor out = backend_->empty({ids.size(), table.shape(1)}, DType::kFloat32);
    backend_->embedding(t, id_list, first_id, out);
    return to_numpy(out);
  }

  // Rotates q and k of a fused [tokens, (H + 2 KV) * D] projection; returns (q, k, v) as
  // [tokens, heads, D], reading k and v back from a one-slot-per-block cache.
  py::tuple rotary(const FloatArray& qkv, const IntArray& positions,
                   const std::vector<float>& inv_freq, int32_t num_heads, int32_t num_kv_heads,
                   int32_t head_dim, bool interleaved) {
    const int64_t tokens = qkv.shape(0);
    require(qkv.ndim() == 2 && qkv.shape(1) == (num_heads + 2LL * num_kv_heads) * head_dim &&
                positions.size() == tokens && 2 * static_cast<int64_t>(inv_freq.size()) == head_dim,
            "rotary shapes disagree");
    ForwardBatch batch;
    batch.token_ids.assign(tokens, 0);  // only the count matters to this op
    batch.positions.assign(positions.data(), positions.data() + tokens);
    for (int32_t t = 0; t < tokens; ++t) batch.slot_mapping.push_back(t);
    AttentionShape shape{num_heads, num_kv_heads, head_dim, 1.f, true};
    RotaryArgs args{&inv_freq, head_dim, interleaved};
    Tensor q = backend_->empty({tokens, num_heads, head_dim}, DType::kFloat32);
    LayerKvCache cache;
    cache.k = backend_->empty({tokens, 1, num_kv_heads, head_dim}, DType::kFloat32);
    cache.v = backend_->empty({tokens, 1, num_kv_heads, head_dim}, DType::kFloat32);
    backend_->rotary_cache_write(in(qkv), batch, shape, args, q, cache);
    return py::make_tuple(to_numpy(q), to_numpy(cache.k.reshaped({tokens, num_kv_heads, head_dim})),
                          to_numpy(cache.v.reshaped({tokens, num_kv_heads, head_dim})));
  }

 private:
  static void require(bool condition, const char* message) {
    if (!condition) throw std::invalid_argument(message);
  }
  Tensor in(const FloatArray& array) {
    return backend_->from_host(array.data(), shape_of(array), DType::kFloat32, DType::kFloat32);
  }
  FloatArray to_numpy(const Tensor& tensor) {
    FloatArray out(tensor.shape());
    backend_->to_host_f32(tensor, out.mutable_data());
    return out;
  }

  std::unique_ptr<Backend> backend_;
};

}  // namespace

void bind_ops(py::module_& m) {
  py::class_<CpuOps>(m, "CpuOps", "single CPU-backend ops, for tests")
      .def(py::init<int>(), py::arg("num_threads") = 0)
      .def("rmsnorm", &CpuOps::rmsnorm)
      .def("linear", &CpuOps::linear, py::arg("x"), py::arg("weight"), py::arg("bias"),
           py::arg("weight_dtype") = "float32")
      .def("silu_mul", &CpuOps::silu_mul)
      .def("embedding", &CpuOps::embedding, py::arg("table"), py::arg("ids"),
           py::arg("dtype") = "float32", py::arg("first_id") = 0)
      .def("rotary", &CpuOps::rotary);

  m.def(
      "rope_inv_freq",
      [](float theta, const std::string& type, float factor, float low, float high,
         int32_t original_max_position, int rotary_dim) {
        RopeConfig rope;
        rope.theta = theta;
        rope.type = type == "llama3"   ? RopeType::kLlama3
                    : type == "linear" ? RopeType::kLinear
                                       : RopeType::kDefault;
        rope.factor = factor;
        rope.low_freq_factor = low;
        rope.high_freq_factor = high;
        rope.original_max_position = original_max_position;
        return models::rope_inv_freq(rope, rotary_dim);
      },
      py::arg("theta"), py::arg("rope_type"), py::arg("factor") = 1.f,
      py::arg("low_freq_factor") = 1.f, py::arg("high_freq_factor") = 4.f,
      py::arg("original_max_position") = 8192, py::arg("rotary_dim"));

  m.def(
      "sample_token",
      [](FloatArray logits, float temperature, int32_t top_k, float top_p,
         float repetition_penalty, const std::vector<int32_t>& history, uint64_t seed) {
        kernels::cpu::SamplingConfig config{temperature, top_k, top_p, repetition_penalty};
        const std::string error = kernels::cpu::sampling_config_error(config);
        if (!error.empty()) throw std::invalid_argument(error);
        if (logits.ndim() != 1 || logits.size() == 0) {
          throw std::invalid_argument("logits must be a non-empty vector");
        }
        std::mt19937_64 rng(seed);
        kernels::cpu::SamplingScratch scratch;
        FloatArray copy(logits.size());
        std::copy_n(logits.data(), logits.size(), copy.mutable_data());
        return kernels::cpu::sample_token(copy.mutable_data(), logits.size(), config,
                                          history.data(), static_cast<int64_t>(history.size()),
                                          rng, scratch);
      },
      py::arg("logits"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
      py::arg("repetition_penalty"), py::arg("history"), py::arg("seed"));
}
