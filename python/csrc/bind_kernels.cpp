// Bindings of the CPU kernels, for op tests and benchmarks. Every input is checked here, with a
// message naming the argument at fault, before a kernel sees a pointer: bad input from Python
// raises ValueError and never reaches memory it does not own.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "kernels/cpu/attention.h"
#include "kernels/cpu/attention_kv16.h"
#include "kernels/cpu/attention_merge.h"

namespace py = pybind11;

namespace {

std::string shape_string(const py::array& array) {
  std::string text = "(";
  for (py::ssize_t i = 0; i < array.ndim(); ++i) {
    if (i > 0) text += ", ";
    text += std::to_string(array.shape(i));
  }
  return text + (array.ndim() == 1 ? ",)" : ")");
}

// Checks dtype, rank and C-contiguity instead of converting: a silent copy would hide a caller's
// layout mistake and cost a pass over the KV cache.
template <typename T>
void check_array(const py::array& array, const char* name, py::ssize_t ndim,
                 const char* dtype_name) {
  if (!array.dtype().is(py::dtype::of<T>())) {
    throw std::invalid_argument(std::string(name) + " must have dtype " + dtype_name + ", got " +
                                py::str(array.dtype()).cast<std::string>());
  }
  if (array.ndim() != ndim) {
    throw std::invalid_argument(std::string(name) + " must have " + std::to_string(ndim) +
                                " dimensions, got shape " + shape_string(array));
  }
  if (!(array.flags() & py::array::c_style)) {
    throw std::invalid_argument(std::string(name) +
                                " must be C-contiguous (use numpy.ascontiguousarray)");
  }
}

void check_dim(const py::array& array, const char* name, py::ssize_t dim, py::ssize_t expected,
               const std::string& meaning) {
  if (array.shape(dim) != expected) {
    throw std::invalid_argument(std::string(name) + " has shape " + shape_string(array) +
                                "; dimension " + std::to_string(dim) + " must be " + meaning +
                                " = " + std::to_string(expected));
  }
}

void check_int32_range(py::ssize_t value, const char* what) {
  if (value > INT32_MAX) {
    throw std::invalid_argument(std::string(what) + " (" + std::to_string(value) +
                                ") does not fit in int32");
  }
}

std::tuple<py::array_t<float>, py::array_t<float>> attention_cpu(
    const py::array& q, const py::array& k_cache, const py::array& v_cache,
    const py::array& block_table, const py::array& cu_seqlens_q, const py::array& seqlens_kv,
    double softmax_scale, bool causal, int num_threads, const std::string& kv_dtype) {
  namespace kcpu = ftengine::kernels::cpu;
  check_array<float>(q, "q", 3, "float32");
  const bool kv16 = kv_dtype != "float32";
  if (kv16 && kv_dtype != "bfloat16" && kv_dtype != "float16") {
    throw std::invalid_argument("kv_dtype must be float32, bfloat16 or float16, got " + kv_dtype);
  }
  if (kv16) {
    // 16-bit caches arrive as their bits (numpy has no bfloat16).
    check_array<uint16_t>(k_cache, "k_cache", 4, "uint16 (the bits of the 16-bit cache)");
    check_array<uint16_t>(v_cache, "v_cache", 4, "uint16 (the bits of the 16-bit cache)");
  } else {
    check_array<float>(k_cache, "k_cache", 4, "float32");
    check_array<float>(v_cache, "v_cache", 4, "float32");
  }
  check_array<int32_t>(block_table, "block_table", 2, "int32");
  check_array<int32_t>(cu_seqlens_q, "cu_seqlens_q", 1, "int32");
  check_array<int32_t>(seqlens_kv, "seqlens_kv", 1, "int32");

  const py::ssize_t num_tokens = q.shape(0);
  const py::ssize_t num_heads = q.shape(1);
  const py::ssize_t head_dim = q.shape(2);
  const py::ssize_t num_blocks = k_cache.shape(0);
  const py::ssize_t block_size = k_cache.shape(1);
  const py::ssize_t num_kv_heads = k_cache.shape(2);
  const py::ssize_t batch = seqlens_kv.shape(0);
  const py::ssize_t max_blocks = block_table.shape(1);

  for (py::ssize_t dim = 0; dim < 4; ++dim) {
    check_dim(v_cache, "v_cache", dim, k_cache.shape(dim), "the same as k_cache's");
  }
  check_dim(k_cache, "k_cache", 3, head_dim, "q's head_dim");
  check_dim(block_table, "block_table", 0, batch, "the batch size len(seqlens_kv)");
  check_dim(cu_seqlens_q, "cu_seqlens_q", 0, batch + 1, "len(seqlens_kv) + 1");
  if (head_dim == 0 || num_heads == 0 || num_kv_heads == 0 || block_size == 0) {
    throw std::invalid_argument(
        "head_dim, num_heads, num_kv_heads and block_size must be "
        "non-zero; got q shape " +
        shape_string(q) + ", k_cache shape " + shape_string(k_cache));
  }
  if (num_heads % num_kv_heads != 0) {
    throw std::invalid_argument("q's num_heads (" + std::to_string(num_heads) +
                                ") must be a multiple of k_cache's num_kv_heads (" +
                                std::to_string(num_kv_heads) + ")");
  }
  if (num_threads < 0) {
    throw std::invalid_argument("num_threads must be >= 0 (0 = OpenMP default), got " +
                                std::to_string(num_threads));
  }
  check_int32_range(num_tokens, "the number of query tokens");
  check_int32_range(num_heads, "num_heads");
  check_int32_range(head_dim, "head_dim");
  check_int32_range(block_size, "block_size");
  check_int32_range(max_blocks, "block_table's second dimension");
  check_int32_range(batch, "batch");
  check_int32_range(num_kv_heads * head_dim, "num_kv_heads * head_dim");
  check_int32_range(max_blocks * block_size, "max_blocks * block_size");

  const auto* cu = static_cast<const int32_t*>(cu_seqlens_q.data());
  const auto* kv_lens = static_cast<const int32_t*>(seqlens_kv.data());
  const auto* table = static_cast<const int32_t*>(block_table.data());
  if (cu[0] != 0) {
    throw std::invalid_argument("cu_seqlens_q[0] must be 0, got " + std::to_string(cu[0]));
  }
  if (cu[batch] != num_tokens) {
    throw std::invalid_argument("cu_seqlens_q[-1] (" + std::to_string(cu[batch]) +
                                ") must equal the number of query tokens q.shape[0] (" +
                                std::to_string(num_tokens) + ")");
  }
  for (py::ssize_t seq = 0; seq < batch; ++seq) {
    if (cu[seq + 1] < cu[seq]) {
      throw std::invalid_argument("cu_seqlens_q must be non-decreasing, but cu_seqlens_q[" +
                                  std::to_string(seq + 1) + "] = " + std::to_string(cu[seq + 1]) +
                                  " < cu_seqlens_q[" + std::to_string(seq) +
                                  "] = " + std::to_string(cu[seq]));
    }
    const int64_t kv_len = kv_lens[seq];
    if (kv_len < 0 || kv_len > static_cast<int64_t>(max_blocks) * block_size) {
      throw std::invalid_argument(
          "seqlens_kv[" + std::to_string(seq) + "] = " + std::to_string(kv_len) +
          " must be in [0, max_blocks * block_size = " + std::to_string(max_blocks * block_size) +
          "]");
    }
    const int64_t q_len = static_cast<int64_t>(cu[seq + 1]) - cu[seq];
    if (causal && q_len > kv_len) {
      throw std::invalid_argument("sequence " + std::to_string(seq) + " has " +
                                  std::to_string(q_len) +
                                  " query tokens but seqlens_kv = " + std::to_string(kv_len) +
                                  "; with causal=True the queries must be the last tokens of "
                                  "the cache");
    }
    // Only the blocks that hold this sequence's tokens are read; the rest of the row is
    // padding and may hold anything.
    const int64_t used_blocks = (kv_len + block_size - 1) / block_size;
    for (int64_t i = 0; i < used_blocks; ++i) {
      const int32_t block = table[seq * max_blocks + i];
      if (block < 0 || block >= num_blocks) {
        throw std::invalid_argument(
            "block_table[" + std::to_string(seq) + ", " + std::to_string(i) +
            "] = " + std::to_string(block) +
            " is not a valid block index (num_blocks = " + std::to_string(num_blocks) + ")");
      }
    }
  }

  py::array_t<float> out({num_tokens, num_heads, head_dim});
  py::array_t<float> lse({num_tokens, num_heads});

  // The fields both members' params share: packed q/out, the cache's layout, the batch.
  auto describe = [&](auto& params) {
    params.q = static_cast<const float*>(q.data());
    params.out = out.mutable_data();
    params.lse = lse.mutable_data();
    params.kv_block_stride = block_size * num_kv_heads * head_dim;
    params.kv_token_stride = num_kv_heads * head_dim;
    params.kv_head_stride = head_dim;
    params.block_size = static_cast<int32_t>(block_size);
    params.block_table = table;
    params.block_table_stride = static_cast<int32_t>(max_blocks);
    params.cu_seqlens_q = cu;
    params.seqlens_kv = kv_lens;
    params.batch = static_cast<int32_t>(batch);
    params.num_heads = static_cast<int32_t>(num_heads);
    params.num_kv_heads = static_cast<int32_t>(num_kv_heads);
    params.head_dim = static_cast<int32_t>(head_dim);
    params.softmax_scale = static_cast<float>(softmax_scale);
    params.causal = causal;
    params.num_threads = num_threads;
  };

  if (kv16) {
    kcpu::Kv16AttentionParams params;
    describe(params);
    params.k_cache = static_cast<const uint16_t*>(k_cache.data());
    params.v_cache = static_cast<const uint16_t*>(v_cache.data());
    params.kv_type = kv_dtype == "bfloat16" ? kcpu::Kv16Type::kBFloat16 : kcpu::Kv16Type::kFloat16;
    const std::string reason = kcpu::kv16_attention_unsupported_reason(params);
    if (!reason.empty()) throw std::invalid_argument("attention_cpu: " + reason);
    py::gil_scoped_release release;
    kcpu::kv16_attention(params);
    return {out, lse};
  }

  kcpu::AttentionParams params;
  describe(params);
  params.q_token_stride = num_heads * head_dim;
  params.q_head_stride = head_dim;
  params.out_token_stride = num_heads * head_dim;
  params.out_head_stride = head_dim;
  params.k_cache = static_cast<const float*>(k_cache.data());
  params.v_cache = static_cast<const float*>(v_cache.data());

  const std::string reason = kcpu::attention_unsupported_reason(params);
  if (!reason.empty()) throw std::invalid_argument("attention_cpu: " + reason);
  {
    py::gil_scoped_release release;
    ftengine::kernels::cpu::attention(params);
  }
  return {out, lse};
}

// Merges (out, lse) partials of the same queries over disjoint key sets.
std::tuple<py::array_t<float>, py::array_t<float>> merge_attention_cpu(const py::list& outs,
                                                                       const py::list& lses) {
  if (outs.size() == 0 || outs.size() != lses.size()) {
    throw std::invalid_argument("merge_attention_cpu needs as many lse arrays as outputs (>= 1)");
  }
  std::vector<py::array> out_arrays, lse_arrays;
  std::vector<const float*> out_pointers, lse_pointers;
  for (size_t p = 0; p < outs.size(); ++p) {
    out_arrays.push_back(outs[p].cast<py::array>());
    lse_arrays.push_back(lses[p].cast<py::array>());
    check_array<float>(out_arrays.back(), "outs[i]", 3, "float32");
    check_array<float>(lse_arrays.back(), "lses[i]", 2, "float32");
    for (int d = 0; d < 3; ++d) {
      check_dim(out_arrays.back(), "outs[i]", d, out_arrays.front().shape(d), "that of outs[0]");
    }
    for (int d = 0; d < 2; ++d) {
      check_dim(lse_arrays.back(), "lses[i]", d, out_arrays.front().shape(d), "outs[0]'s");
    }
    out_pointers.push_back(static_cast<const float*>(out_arrays.back().data()));
    lse_pointers.push_back(static_cast<const float*>(lse_arrays.back().data()));
  }
  const auto& first = out_arrays.front();
  py::array_t<float> out({first.shape(0), first.shape(1), first.shape(2)});
  py::array_t<float> lse({first.shape(0), first.shape(1)});
  ftengine::kernels::cpu::merge_attention_partials(
      out_pointers.data(), lse_pointers.data(), static_cast<int>(outs.size()),
      first.shape(0) * first.shape(1), static_cast<int32_t>(first.shape(2)), out.mutable_data(),
      lse.mutable_data());
  return {out, lse};
}

}  // namespace

void bind_kernels(py::module_& m) {
  m.def("merge_attention_cpu", &merge_attention_cpu, py::arg("outs"), py::arg("lses"),
        "Merges attention outputs [T, H, D] and log-sum-exps [T, H] computed over disjoint key "
        "sets of the same queries (the cooperative path's tiers) into one (out, lse).");
  m.def("attention_cpu", &attention_cpu, py::arg("q"), py::arg("k_cache"), py::arg("v_cache"),
        py::arg("block_table"), py::arg("cu_seqlens_q"), py::arg("seqlens_kv"),
        py::arg("softmax_scale"), py::arg("causal"), py::arg("num_threads") = 0,
        py::arg("kv_dtype") = "float32",
        "Exact attention over a paged KV cache. Returns (out [T, H, D], lse [T, H]); see "
        "kernels/cpu/attention.h for the layout. kv_dtype 'bfloat16' or 'float16' takes the "
        "caches as uint16 arrays of those bits and runs the 16-bit member "
        "(kernels/cpu/attention_kv16.h, the host tier of cooperative attention).");
}
