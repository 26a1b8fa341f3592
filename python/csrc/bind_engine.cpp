// Bindings of the runtime: a Runtime owns one backend, one model, its KV cache and the generator.
// This file is the only place that knows both engine/ and models/.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

#include "engine/backend.h"
#include "engine/communicator.h"
#include "engine/generator.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/weight_store.h"
#include "models/registry.h"

namespace py = pybind11;
using namespace ftengine;

namespace {

template <typename T>
T required(const py::dict& config, const char* key) {
  if (!config.contains(key)) throw std::invalid_argument(std::string("config lacks '") + key + "'");
  return config[key].cast<T>();
}

DType parse_dtype(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "bfloat16") return DType::kBFloat16;
  if (name == "float16") return DType::kFloat16;
  throw std::invalid_argument("unsupported dtype '" + name + "' (float32, bfloat16 or float16)");
}

RopeType parse_rope_type(const std::string& name) {
  if (name == "default") return RopeType::kDefault;
  if (name == "linear") return RopeType::kLinear;
  if (name == "llama3") return RopeType::kLlama3;
  throw std::invalid_argument("unsupported rope_type '" + name + "'");
}

// The Python loader normalises config.json into this flat dict (ftengine/config.py).
ModelConfig model_config_from_dict(const py::dict& d) {
  ModelConfig c;
  c.architecture = required<std::string>(d, "architecture");
  c.vocab_size = required<int32_t>(d, "vocab_size");
  c.hidden_size = required<int32_t>(d, "hidden_size");
  c.intermediate_size = required<int32_t>(d, "intermediate_size");
  c.num_layers = required<int32_t>(d, "num_layers");
  c.num_heads = required<int32_t>(d, "num_heads");
  c.num_kv_heads = required<int32_t>(d, "num_kv_heads");
  c.head_dim = required<int32_t>(d, "head_dim");
  c.max_position_embeddings = required<int32_t>(d, "max_position_embeddings");
  c.norm_eps = required<float>(d, "norm_eps");
  c.rope.theta = required<float>(d, "rope_theta");
  c.rope.type = parse_rope_type(required<std::string>(d, "rope_type"));
  c.rope.factor = required<float>(d, "rope_factor");
  c.rope.low_freq_factor = required<float>(d, "rope_low_freq_factor");
  c.rope.high_freq_factor = required<float>(d, "rope_high_freq_factor");
  c.rope.original_max_position = required<int32_t>(d, "rope_original_max_position");
  c.rope.interleaved = required<bool>(d, "rope_interleaved");
  c.rope.freq_factors = required<std::vector<float>>(d, "rope_freq_factors");
  c.attention_bias = required<bool>(d, "attention_bias");
  c.mlp_bias = required<bool>(d, "mlp_bias");
  c.tie_word_embeddings = required<bool>(d, "tie_word_embeddings");
  c.weight_dtype = parse_dtype(required<std::string>(d, "weight_dtype"));
  return c;
}

struct RuntimeOptions {
  std::string device = "cpu";  // "cpu" or "cuda"
  int device_index = 0;
  bool cuda_graphs = true;  // record decode steps as CUDA graphs
  std::string attention_kernel = "auto";  // force one member of the CUDA attention family
  int num_threads = 0;
  int32_t kv_cache_tokens = 0;
  // The KV tokens the GPU holds; the rest of kv_cache_tokens go to the host tier. 0: all.
  int32_t gpu_kv_tokens = 0;
  std::string host_tier_route = "auto";  // where host-tier keys are attended
  int32_t block_size = 0;
  int32_t allreduce_tile_tokens = 0;  // 0: automatic, -1: one AllReduce per projection
  GeneratorOptions generator;
};

std::unique_ptr<Backend> make_backend(const RuntimeOptions& options, DType weight_dtype) {
  if (options.device == "cpu") {
    if (weight_dtype == DType::kFloat16) {
      throw std::invalid_argument("the CPU backend stores weights as float32 or bfloat16");
    }
    return make_cpu_backend(options.num_threads);
  }
  if (options.device == "cuda") {
#ifdef FTENGINE_WITH_CUDA
    if (weight_dtype == DType::kFloat32) {
      throw std::invalid_argument("the CUDA backend runs float16 or bfloat16 models");
    }
    return make_cuda_backend(options.device_index, weight_dtype, options.cuda_graphs,
                             options.attention_kernel, options.host_tier_route,
                             options.num_threads);
#else
    throw std::invalid_argument("this build of ftengine has no CUDA backend");
#endif
  }
  throw std::invalid_argument("unknown device '" + options.device + "' (cpu or cuda)");
}

// Built in two stages so weights stream in one tensor at a time: construct (backend and weight
// store), add_weight for every tensor, then build (model, KV cache, generator).
class Runtime {
 public:
  Runtime(const py::dict& config_dict, const RuntimeOptions& options,
          std::shared_ptr<Communicator> communicator)
      : config_(model_config_from_dict(config_dict)),
        options_(options),
        communicator_(communicator ? std::move(communicator) : make_single_rank_communicator()),
        backend_(make_backend(options, config_.weight_dtype)) {
    if (!communicator_->serves(backend_->device())) {
      throw std::invalid_argument("the communicator cannot sum " + backend_->name() +
                                  " memory: tensor parallelism runs over MPI on the CPU and "
                                  "over NCCL on CUDA");
    }
    communicator_->use_stream(backend_->stream());
    if (options.block_size <= 0 || options.kv_cache_tokens <= 0) {
      throw std::invalid_argument("block_size and kv_cache_tokens must be positive");
    }
    if (options.gpu_kv_tokens < 0) throw std::invalid_argument("gpu_kv_tokens must be >= 0");
    for (auto& spec : models::expected_weights(config_, parallel())) {
      specs_.emplace(spec.name, spec.local_shape());
    }
  }

  TensorParallel parallel() const { return {communicator_->rank(), communicator_->size()}; }

  // Matrices are stored in the config's weight dtype, vectors (norms, biases) in float32.
  // `array` holds float32, or uint16 bits when `source_dtype` is bfloat16.
  void add_weight(const std::string& name, const py::array& array, const std::string& source) {
    require_unbuilt();
    const DType source_dtype = parse_dtype(source);
    auto contiguous = py::array::ensure(array, py::array::c_style);
    if (!contiguous || static_cast<size_t>(contiguous.itemsize()) != dtype_size(source_dtype)) {
      throw std::invalid_argument("weight " + name + " does not hold " + source + " items");
    }
    Shape shape(contiguous.shape(), contiguous.shape() + contiguous.ndim());
    // The model reads weights at the shapes it expects: anything else would be read out of
    // bounds, so it is refused here whatever the loader checked.
    auto spec = specs_.find(name);
    if (spec == specs_.end()) {
      throw std::invalid_argument("weight " + name + " is not used by " + config_.architecture);
    }
    if (spec->second != shape) {
      throw std::invalid_argument("weight " + name + " has shape " + shape_string(shape) +
                                  "; this rank expects " + shape_string(spec->second));
    }
    const DType stored = shape.size() >= 2 ? config_.weight_dtype : DType::kFloat32;
    const void* data = contiguous.data();
    py::gil_scoped_release release;
    weights_.add(name, backend_->from_host(data, shape, source_dtype, stored));
  }

  void build() {
    require_unbuilt();
    for (const auto& spec : specs_) {
      if (!weights_.contains(spec.first)) {
        throw std::invalid_argument("weight " + spec.first + " was never added");
      }
    }
    {
      py::gil_scoped_release release;
      model_ = models::create_model(config_, weights_, *backend_, communicator_,
                                    options_.allreduce_tile_tokens);
    }
    AttentionShape attention;
    attention.num_heads = config_.num_heads / communicator_->size();
    attention.num_kv_heads = model_->local_kv_heads();
    attention.head_dim = config_.head_dim;
    attention.softmax_scale = 1.f / std::sqrt(static_cast<float>(config_.head_dim));
    const std::string unsupported =
        backend_->attention_unsupported_reason(attention, options_.block_size);
    if (!unsupported.empty()) {
      throw std::invalid_argument("this model cannot run on " + backend_->name() + ": " +
                                  unsupported);
    }
    KvCacheShape shape;
    shape.num_layers = config_.num_layers;
    shape.block_size = options_.block_size;
    shape.num_blocks = (options_.kv_cache_tokens + options_.block_size - 1) / options_.block_size;
    if (options_.gpu_kv_tokens > 0) {
      const int32_t device_blocks = std::max(options_.gpu_kv_tokens / options_.block_size, 1);
      shape.host_tier_blocks = std::max(shape.num_blocks - device_blocks, 0);
    }
    shape.num_kv_heads = model_->local_kv_heads();
    shape.head_dim = config_.head_dim;
    cache_ = std::make_unique<KvCache>(shape, backend_->activation_dtype(), *backend_);
    generator_ = std::make_unique<Generator>(*model_, *cache_, *backend_, options_.generator);
  }

  // Serialises every use of the generator: step() runs without the GIL, so two Python threads
  // could otherwise drive one generator at once.
  std::mutex& lock() { return mutex_; }

  Generator& generator() {
    if (!generator_) throw std::runtime_error("the runtime is not built yet: call build()");
    return *generator_;
  }
  const KvCache& cache() const {
    if (!cache_) throw std::runtime_error("the runtime is not built yet: call build()");
    return *cache_;
  }
  int num_threads() const { return backend_->num_threads(); }
  const Backend& backend() const { return *backend_; }

 private:
  void require_unbuilt() const {
    if (model_) throw std::runtime_error("the runtime is already built");
  }

  ModelConfig config_;
  RuntimeOptions options_;
  std::shared_ptr<Communicator> communicator_;
  std::map<std::string, Shape> specs_;  // this rank's shape of every weight
  std::mutex mutex_;
  // Destroyed in reverse: generator, cache and model before the backend that owns their memory.
  std::unique_ptr<Backend> backend_;
  WeightStore weights_;
  std::unique_ptr<Model> model_;
  std::unique_ptr<KvCache> cache_;
  std::unique_ptr<Generator> generator_;
};

}  // namespace

void bind_engine(py::module_& m) {
  m.def("supported_architectures", &models::supported_architectures);
  m.def(
      "expected_weights",
      [](const py::dict& config, int rank, int size) {
        std::vector<py::tuple> specs;
        for (auto& spec : models::expected_weights(model_config_from_dict(config), {rank, size})) {
          specs.push_back(py::make_tuple(spec.name, spec.shape, spec.shard_axis, spec.shard_begin,
                                         spec.shard_count));
        }
        return specs;
      },
      py::arg("config"), py::arg("rank") = 0, py::arg("size") = 1,
      "[(name, shape, shard_axis, shard_begin, shard_count)] of every tensor the architecture "
      "needs; shard_axis -1 means the rank loads the whole tensor");

  // The collectives take raw addresses (numpy's ctypes.data, torch's data_ptr()) in the memory
  // the communicator serves, for the communicator tests; the engine calls them from C++.
  auto address = [](uintptr_t value) { return reinterpret_cast<void*>(value); };
  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def(
          "use_stream",
          [address](Communicator& c, uintptr_t stream) { c.use_stream(address(stream)); },
          py::arg("stream"), "orders device collectives against this cudaStream_t")
      .def(
          "allreduce_sum",
          [address](Communicator& c, uintptr_t data, int64_t count, const std::string& dtype) {
            c.allreduce_sum(address(data), count, parse_dtype(dtype));
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"),
          py::call_guard<py::gil_scoped_release>())
      .def(
          "start_allreduce_sum",
          [address](Communicator& c, uintptr_t data, int64_t count, const std::string& dtype) {
            c.start_allreduce_sum(address(data), count, parse_dtype(dtype));
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"),
          py::call_guard<py::gil_scoped_release>())
      .def("wait_all", &Communicator::wait_all, py::call_guard<py::gil_scoped_release>())
      .def(
          "allgather",
          [address](Communicator& c, uintptr_t data, int64_t count, const std::string& dtype,
                    uintptr_t out) {
            c.allgather(address(data), count, parse_dtype(dtype), address(out));
          },
          py::arg("data"), py::arg("count"), py::arg("dtype"), py::arg("out"),
          py::call_guard<py::gil_scoped_release>())
      .def(
          "allreduce_sum_host",
          [](Communicator& c, std::vector<float> values) {
            c.allreduce_sum_host(values.data(), static_cast<int64_t>(values.size()));
            return values;
          },
          py::arg("values"), "the sum over ranks of each of `values`");
  m.def("single_rank_communicator", &make_single_rank_communicator);

  py::enum_<FinishReason>(m, "FinishReason")
      .value("none", FinishReason::kNone)
      .value("stop_token", FinishReason::kStopToken)
      .value("length", FinishReason::kLength);

  py::class_<Runtime>(m, "Runtime")
      .def(py::init([](const py::dict& config, int num_threads, int32_t kv_cache_tokens,
                       int32_t block_size, int32_t max_step_tokens, int32_t max_sequences,
                       std::shared_ptr<Communicator> communicator,
                       int32_t allreduce_tile_tokens, const std::string& device,
                       int device_index, bool cuda_graphs,
                       const std::string& attention_kernel, int32_t gpu_kv_tokens,
                       const std::string& host_tier_route) {
             RuntimeOptions options;
             options.device = device;
             options.device_index = device_index;
             options.cuda_graphs = cuda_graphs;
             options.attention_kernel = attention_kernel;
             options.num_threads = num_threads;
             options.kv_cache_tokens = kv_cache_tokens;
             options.gpu_kv_tokens = gpu_kv_tokens;
             options.host_tier_route = host_tier_route;
             options.block_size = block_size;
             options.allreduce_tile_tokens = allreduce_tile_tokens;
             options.generator.max_step_tokens = max_step_tokens;
             options.generator.max_sequences = max_sequences;
             return std::make_unique<Runtime>(config, options, std::move(communicator));
           }),
           py::arg("config"), py::arg("num_threads"), py::arg("kv_cache_tokens"),
           py::arg("block_size"), py::arg("max_step_tokens"), py::arg("max_sequences"),
           py::arg("communicator") = nullptr, py::arg("allreduce_tile_tokens") = 0,
           py::arg("device") = "cpu", py::arg("device_index") = 0,
           py::arg("cuda_graphs") = true, py::arg("attention_kernel") = "auto",
           py::arg("gpu_kv_tokens") = 0, py::arg("host_tier_route") = "auto")
      .def("add_weight", &Runtime::add_weight, py::arg("name"), py::arg("array"),
           py::arg("source_dtype"))
      .def("build", &Runtime::build)
      .def_property_readonly("num_threads", &Runtime::num_threads)
      .def_property_readonly("kv_cache_bytes", [](const Runtime& r) { return r.cache().bytes(); })
      .def_property_readonly("kv_cache_tokens",
                             [](const Runtime& r) {
                               const auto& s = r.cache().shape();
                               return static_cast<int64_t>(s.num_blocks) * s.block_size;
                             })
      .def_property_readonly("host_tier_tokens",
                             [](const Runtime& r) {
                               const auto& s = r.cache().shape();
                               return static_cast<int64_t>(s.host_tier_blocks) * s.block_size;
                             })
      .def(
          "host_tier_stats",
          [](Runtime& r) {
            std::lock_guard<std::mutex> guard(r.lock());  // a stepping thread updates them
            const HostTierStats stats = r.backend().host_tier_stats();
            py::dict out;
            out["layers"] = stats.layers;
            out["cpu_seconds"] = stats.cpu_seconds;
            out["query_wait_seconds"] = stats.query_wait_seconds;
            out["streamed_bytes"] = stats.streamed_bytes;
            out["cpu_bytes"] = stats.cpu_bytes;
            return out;
          },
          "What the KV cache's host tier has cost so far: attention calls over it, seconds of "
          "the CPU kernel and of waiting for queries, bytes streamed to the GPU")
      .def(
          "add_request",
          [](Runtime& r, std::vector<int32_t> prompt, float temperature, int32_t top_k,
             float top_p, float repetition_penalty, uint64_t seed, int32_t max_new_tokens,
             std::vector<int32_t> stop_token_ids, int32_t prefilled_tokens) {
            RequestOptions options;
            options.sampling.temperature = temperature;
            options.sampling.top_k = top_k;
            options.sampling.top_p = top_p;
            options.sampling.repetition_penalty = repetition_penalty;
            options.seed = seed;
            options.max_new_tokens = max_new_tokens;
            options.stop_token_ids = std::move(stop_token_ids);
            options.prefilled_tokens = prefilled_tokens;
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> guard(r.lock());
            return r.generator().add_request(std::move(prompt), options);
          },
          py::arg("prompt"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
          py::arg("repetition_penalty"), py::arg("seed"), py::arg("max_new_tokens"),
          py::arg("stop_token_ids"), py::arg("prefilled_tokens") = 0)
      .def(
          "step",
          [](Runtime& r) {
            std::vector<TokenEvent> events;
            {
              py::gil_scoped_release release;
              std::lock_guard<std::mutex> guard(r.lock());
              events = r.generator().step();
            }
            std::vector<std::tuple<int64_t, int32_t, FinishReason>> out;
            out.reserve(events.size());
            for (const auto& e : events) out.emplace_back(e.request_id, e.token, e.finish);
            return out;
          },
          "one forward pass; [(request_id, token, finish_reason)]")
      .def("abort",
           [](Runtime& r, int64_t id) {
             py::gil_scoped_release release;
             std::lock_guard<std::mutex> guard(r.lock());
             r.generator().abort(id);
           })
      .def("has_unfinished",
           [](Runtime& r) {
             py::gil_scoped_release release;
             std::lock_guard<std::mutex> guard(r.lock());
             return r.generator().has_unfinished();
           })
      .def("prompt_logits", [](Runtime& r, const std::vector<int32_t>& prompt) {
        std::vector<float> logits;
        {
          py::gil_scoped_release release;
          std::lock_guard<std::mutex> guard(r.lock());
          logits = r.generator().prompt_logits(prompt);
        }
        const int64_t rows = static_cast<int64_t>(prompt.size());
        py::array_t<float> out({rows, static_cast<int64_t>(logits.size()) / rows});
        std::copy(logits.begin(), logits.end(), out.mutable_data());
        return out;
      });
}
