#include "engine/cuda/cooperative_attention.h"

#include <algorithm>
#include <stdexcept>

#include "engine/cuda/cuda_check.h"
#include "kernels/cpu/attention_kv16.h"
#include "kernels/cpu/bfloat16.h"
#include "kernels/cuda/elementwise.h"

namespace ftengine::cuda {
namespace {

namespace kc = kernels::cuda;
namespace kcpu = kernels::cpu;
using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

kc::DataType data_type(kc::ElementType type) {
  return type == kc::ElementType::kFloat16 ? kc::DataType::kFloat16 : kc::DataType::kBFloat16;
}

}  // namespace

HostTierRoute parse_host_tier_route(const std::string& name) {
  if (name == "auto") return HostTierRoute::kAuto;
  if (name == "cpu") return HostTierRoute::kCpu;
  if (name == "stream") return HostTierRoute::kStream;
  throw std::invalid_argument("unknown host-tier attention route '" + name +
                              "' (auto, cpu, stream)");
}

CooperativeAttention::CooperativeAttention(Allocator& device, Allocator& pinned,
                                           cudaStream_t stream, HostTierRoute route,
                                           int cpu_threads)
    : device_(device), pinned_(pinned), stream_(stream), route_(route), cpu_threads_(cpu_threads) {
  check_cuda(cudaEventCreateWithFlags(&queries_ready_, cudaEventDisableTiming), "cudaEventCreate");
  for (auto& set : events_) {
    for (cudaEvent_t& event : set) check_cuda(cudaEventCreate(&event), "cudaEventCreate");
  }
}

CooperativeAttention::~CooperativeAttention() {
  if (queries_ready_) cudaEventDestroy(queries_ready_);
  for (auto& set : events_) {
    for (cudaEvent_t event : set) {
      if (event) cudaEventDestroy(event);
    }
  }
}

Tensor CooperativeAttention::grow(Tensor& buffer, Allocator& allocator, size_t bytes) {
  if (!buffer.defined() || buffer.nbytes() < bytes) {
    // The old buffer may still be read by queued work: stream order frees it safely on the
    // device side, but host memory must not be reused before the queue has passed it.
    if (buffer.defined() && buffer.device() == Device::kCpu) {
      check_cuda(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    }
    // Half again at a time: a staging area that follows a growing sequence is not reallocated
    // (and the caching allocator not handed a dead gigabyte) for every block.
    const size_t grown = buffer.defined() ? std::max(bytes, buffer.nbytes() * 3 / 2) : bytes;
    buffer = Tensor({static_cast<int64_t>((grown + 3) / 4)}, DType::kInt32, allocator);
  }
  return buffer;
}

int32_t CooperativeAttention::cpu_blocks(int32_t host_blocks) const {
  if (!cpu_serves_model_ || route_ == HostTierRoute::kStream) return 0;
  if (route_ == HostTierRoute::kCpu) return host_blocks;
  // auto: at least one block each way, so both sides keep being measured.
  if (host_blocks < 2) return 0;
  const auto share = static_cast<int32_t>(cpu_share_ * host_blocks + 0.5);
  return std::clamp(share, 1, host_blocks - 1);
}

void CooperativeAttention::balance() {
  if (!pending_) return;
  const Measurement last = *pending_;
  pending_.reset();
  cudaEvent_t* events = events_[last.event_set];
  float unsplit_ms = 0, split_ms = 0;
  check_cuda(cudaEventElapsedTime(&unsplit_ms, events[0], events[1]), "cudaEventElapsedTime");
  check_cuda(cudaEventElapsedTime(&split_ms, events[1], events[2]), "cudaEventElapsedTime");
  if (last.cpu_seconds <= 0 || last.cpu_bytes <= 0 || split_ms <= 0) return;
  // The CPU started with the GPU's device attention (unsplit) and should end with its
  // streamed share: share·H / cpu_rate = unsplit + (1 − share)·H / bus_rate.
  const double bytes = last.cpu_bytes + last.split_bytes;
  const double cpu_seconds_per_byte = last.cpu_seconds / last.cpu_bytes;
  const double bus_seconds_per_byte = split_ms * 1e-3 / last.split_bytes;
  const double target = (unsplit_ms * 1e-3 + bytes * bus_seconds_per_byte) /
                        (bytes * (cpu_seconds_per_byte + bus_seconds_per_byte));
  cpu_share_ = std::clamp(0.5 * cpu_share_ + 0.5 * target, 0.0, 1.0);
}

void CooperativeAttention::plan(const ForwardBatch& batch) {
  active_ = batch.uses_host_tier();
  batch_ = &batch;
  if (!active_) return;
  const int32_t n = batch.num_sequences();
  cpu_parts_.clear();
  streamed_parts_.clear();
  cpu_cu_seqlens_.assign(1, 0);
  cpu_seqlens_.clear();
  cpu_rows_ = 0;
  max_device_len_ = 0;

  // Indices: device seqlens [n], then the CPU rows' tokens, then per-part arguments, then the
  // staging area's identity table.
  host_indices_.assign(static_cast<size_t>(n), 0);
  device_seqlens_ = 0;
  std::vector<HostPart> parts;
  for (int32_t s = 0; s < n; ++s) {
    const int32_t q_start = batch.cu_seqlens_q[s];
    const int32_t q_len = batch.cu_seqlens_q[s + 1] - q_start;
    const int32_t kv_len = batch.seqlens_kv[s];
    const int32_t tier = batch.host_tier_start[s];
    if (kv_len <= tier) {
      host_indices_[s] = kv_len;
      max_device_len_ = std::max(max_device_len_, kv_len);
      continue;
    }
    if (kv_len - q_len < tier) {
      throw std::logic_error("cooperative attention: a step's tokens straddle the host tier");
    }
    // One query sees its whole device prefix under the causal rule too; several need their
    // own non-causal call, so the batched call skips them.
    host_indices_[s] = q_len == 1 ? tier : 0;
    max_device_len_ = std::max(max_device_len_, host_indices_[s]);
    parts.push_back({s, q_start, q_len, tier, tier, kv_len - tier, 0, 0, false});
  }
  prefix_parts_.clear();
  for (const HostPart& part : parts) {
    if (part.q_len > 1 && part.device_len > 0) prefix_parts_.push_back(part);
    // The CPU's slice: the first blocks of a decode step's host keys (every query sees them
    // all); prompt chunks stream unless the CPU route is forced.
    const int32_t host_blocks = (part.host_len + batch.block_size - 1) / batch.block_size;
    const int32_t cpu_len =
        part.q_len == 1 || (route_ == HostTierRoute::kCpu && cpu_serves_model_)
            ? std::min(part.host_len, cpu_blocks(host_blocks) * batch.block_size)
            : 0;
    if (cpu_len > 0) {
      HostPart cpu = part;
      cpu.host_len = cpu_len;
      cpu_parts_.push_back(cpu);
    }
    if (cpu_len < part.host_len) {
      HostPart streamed = part;
      streamed.host_start = part.host_start + cpu_len;
      streamed.host_len = part.host_len - cpu_len;
      streamed.split = cpu_len > 0;
      streamed_parts_.push_back(streamed);
    }
  }
  cpu_tokens_ = static_cast<int32_t>(host_indices_.size());
  for (const HostPart& part : cpu_parts_) {
    for (int32_t t = 0; t < part.q_len; ++t) host_indices_.push_back(part.q_start + t);
    cpu_rows_ += part.q_len;
  }
  for (HostPart& part : prefix_parts_) {
    part.device_args = static_cast<int32_t>(host_indices_.size());
    host_indices_.insert(host_indices_.end(), {0, part.q_len, part.device_len});
  }
  // Streamed slices attend in the order of the events balance() reads: whole parts first.
  std::stable_partition(streamed_parts_.begin(), streamed_parts_.end(),
                        [](const HostPart& part) { return !part.split; });
  int32_t max_streamed_blocks = 0;
  // CPU parts get streaming arguments too: a model the CPU member cannot take streams them.
  for (std::vector<HostPart>* list : {&streamed_parts_, &cpu_parts_}) {
    for (HostPart& part : *list) {
      part.host_args = static_cast<int32_t>(host_indices_.size());
      host_indices_.insert(host_indices_.end(), {0, part.q_len, part.host_len});
      max_streamed_blocks = std::max(max_streamed_blocks,
                                     (part.host_len + batch.block_size - 1) / batch.block_size);
    }
  }
  // Table rows of the CPU parts: their host blocks, global ids until the first layer says
  // where the cache's tier starts.
  cpu_table_stride_ = 1;
  for (const HostPart& part : cpu_parts_) {
    cpu_cu_seqlens_.push_back(cpu_cu_seqlens_.back() + part.q_len);
    cpu_seqlens_.push_back(part.host_len);
    cpu_table_stride_ =
        std::max(cpu_table_stride_, (part.host_len + batch.block_size - 1) / batch.block_size);
  }
  cpu_table_.assign(cpu_parts_.size() * static_cast<size_t>(cpu_table_stride_), 0);
  cpu_table_host_relative_ = false;
  for (size_t i = 0; i < cpu_parts_.size(); ++i) {
    const HostPart& part = cpu_parts_[i];
    const int32_t* first = batch.block_table.data() +
                           int64_t{part.seq} * batch.block_table_stride +
                           part.host_start / batch.block_size;
    std::copy(first, first + (part.host_len + batch.block_size - 1) / batch.block_size,
              cpu_table_.begin() + i * cpu_table_stride_);
  }
  identity_table_ = static_cast<int32_t>(host_indices_.size());
  for (int32_t i = 0; i < max_streamed_blocks; ++i) host_indices_.push_back(i);

  grow(indices_, device_, host_indices_.size() * sizeof(int32_t));
  // From pageable memory: the copy is staged before the call returns, so the vector may change.
  check_cuda(cudaMemcpyAsync(indices_.raw(), host_indices_.data(),
                             host_indices_.size() * sizeof(int32_t), cudaMemcpyHostToDevice,
                             stream_),
             "cudaMemcpyAsync(host-tier indices)");
}

void CooperativeAttention::run(const kc::AttentionParams& whole_in, const LayerKvCache& cache,
                               const RunGpu& run_gpu) {
  ++stats_.layers;
  if (whole_in.num_heads / whole_in.num_kv_heads > kcpu::kKv16MaxQueryGroup) {
    // The CPU member cannot take this model: its host keys stream, from this layer on.
    cpu_serves_model_ = false;
    for (HostPart& part : cpu_parts_) {
      streamed_parts_.push_back(part);
    }
    cpu_parts_.clear();
  }
  kc::AttentionParams whole = whole_in;
  const int64_t tokens = batch_->num_tokens();
  if (!whole.lse) {
    whole.lse = grow(scratch_lse_, device_, tokens * whole.num_heads * sizeof(float))
                    .data<float>();
  }
  const int32_t* indices = indices_.data<int32_t>();
  const size_t row_bytes = static_cast<size_t>(whole.num_heads) * whole.head_dim * 2;

  // 1. The CPU parts' queries to the host first, so the CPU starts while the GPU attends.
  if (!cpu_parts_.empty()) {
    grow(pinned_queries_, pinned_, cpu_rows_ * row_bytes);
    size_t offset = 0;
    for (const HostPart& part : cpu_parts_) {
      check_cuda(cudaMemcpyAsync(static_cast<char*>(pinned_queries_.raw()) + offset,
                                 static_cast<const char*>(whole.q) + part.q_start * row_bytes,
                                 part.q_len * row_bytes, cudaMemcpyDeviceToHost, stream_),
                 "cudaMemcpyAsync(queries to host)");
      offset += part.q_len * row_bytes;
    }
    check_cuda(cudaEventRecord(queries_ready_, stream_), "cudaEventRecord");
  }

  // 2. Every sequence's device keys, in one call.
  const bool measure = route_ == HostTierRoute::kAuto && !cpu_parts_.empty();
  cudaEvent_t* events = events_[event_set_];
  if (measure) check_cuda(cudaEventRecord(events[0], stream_), "cudaEventRecord");
  kc::AttentionParams device = whole;
  device.seqlens_kv = indices + device_seqlens_;
  device.max_seqlen_kv = max_device_len_;
  run_gpu(device);

  // 3. Sequences with several queries in the tier see their whole device prefix.
  for (const HostPart& part : prefix_parts_) {
      kc::AttentionParams prefix = whole;
      prefix.q = static_cast<const char*>(whole.q) + part.q_start * row_bytes;
      prefix.out = static_cast<char*>(whole.out) + part.q_start * row_bytes;
      prefix.lse = whole.lse + int64_t{part.q_start} * whole.num_heads;
      prefix.block_table = whole.block_table + int64_t{part.seq} * whole.block_table_stride;
      prefix.cu_seqlens_q = indices + part.device_args;
      prefix.seqlens_kv = indices + part.device_args + 2;
      prefix.batch = 1;
      prefix.max_seqlen_q = part.q_len;
      prefix.max_seqlen_kv = part.device_len;
      prefix.causal = false;
      run_gpu(prefix);
  }

  // 4. Host keys over the bus: whole parts, then the slices the CPU shares (timed for auto).
  double split_bytes = 0;
  for (const HostPart& part : streamed_parts_) {
    if (part.split && measure && split_bytes == 0) {
      check_cuda(cudaEventRecord(events[1], stream_), "cudaEventRecord");
    }
    const double bytes = stream_part(part, whole, cache, run_gpu);
    if (part.split) split_bytes += bytes;
  }
  if (measure && split_bytes > 0) check_cuda(cudaEventRecord(events[2], stream_), "cudaEventRecord");

  // 5. The CPU attends over its host keys in place meanwhile (balancing on the last layer's
  // measurement first).
  if (!cpu_parts_.empty()) run_cpu_parts(whole, cache);
  if (measure && split_bytes > 0) {
    pending_ = Measurement{event_set_, last_cpu_seconds_, last_cpu_bytes_, split_bytes};
    event_set_ ^= 1;
  }
}

double CooperativeAttention::stream_part(const HostPart& part, const kc::AttentionParams& whole,
                                         const LayerKvCache& cache, const RunGpu& run_gpu) {
  const int32_t block_size = whole.block_size;
  const size_t block_bytes = cache.k_host.nbytes() / cache.k_host.dim(0);
  const int32_t first = part.host_start / block_size;
  const int32_t count = (part.host_len + block_size - 1) / block_size;
  grow(stage_k_, device_, count * block_bytes);
  grow(stage_v_, device_, count * block_bytes);
  const int32_t* row = batch_->block_table.data() + int64_t{part.seq} * batch_->block_table_stride;
  // Runs of adjacent host blocks go in one copy each.
  for (int32_t i = 0; i < count;) {
    int32_t run = 1;
    while (i + run < count && row[first + i + run] == row[first + i] + run) ++run;
    const size_t from = static_cast<size_t>(row[first + i] - cache.host_first_block) * block_bytes;
    for (auto [stage, host] : {std::pair{&stage_k_, &cache.k_host}, {&stage_v_, &cache.v_host}}) {
      check_cuda(cudaMemcpyAsync(static_cast<char*>(stage->raw()) + i * block_bytes,
                                 static_cast<const char*>(host->raw()) + from, run * block_bytes,
                                 cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync(host tier to GPU)");
    }
    i += run;
  }
  const double streamed = 2.0 * count * block_bytes;
  stats_.streamed_bytes += streamed;

  const int32_t* indices = indices_.data<int32_t>();
  const size_t row_elements = static_cast<size_t>(whole.num_heads) * whole.head_dim;
  grow(part_out_, device_, part.q_len * row_elements * 2);
  grow(part_lse_, device_, part.q_len * whole.num_heads * sizeof(float));
  kc::AttentionParams host = whole;
  host.q = static_cast<const char*>(whole.q) + part.q_start * row_elements * 2;
  host.out = part_out_.raw();
  host.lse = part_lse_.data<float>();
  host.k_cache = stage_k_.raw();
  host.v_cache = stage_v_.raw();
  host.kv_num_blocks = count;
  host.block_table = indices + identity_table_;
  host.block_table_stride = count;
  host.cu_seqlens_q = indices + part.host_args;
  host.seqlens_kv = indices + part.host_args + 2;
  host.batch = 1;
  host.max_seqlen_q = part.q_len;
  host.max_seqlen_kv = part.host_len;
  run_gpu(host);
  kc::merge_attention_part(whole.out, whole.lse, data_type(whole.dtype), part_out_.raw(),
                           part_lse_.data<float>(), data_type(whole.dtype), nullptr, part.q_start,
                           part.q_len, whole.num_heads, whole.head_dim, stream_);
  return streamed;
}

void CooperativeAttention::run_cpu_parts(const kc::AttentionParams& whole,
                                         const LayerKvCache& cache) {
  const int64_t row_elements = int64_t{whole.num_heads} * whole.head_dim;
  const int64_t rows = cpu_rows_;
  // Host-tier block ids, once a step (every layer's cache has its tier at the same block).
  if (!cpu_table_host_relative_) {
    for (int32_t& block : cpu_table_) block -= cache.host_first_block;
    cpu_table_host_relative_ = true;
  }
  grow(pinned_results_, pinned_, rows * (row_elements + whole.num_heads) * sizeof(float));
  float* out = pinned_results_.data<float>();
  float* lse = out + rows * row_elements;
  queries_f32_.resize(static_cast<size_t>(rows * row_elements));

  Clock::time_point start = Clock::now();
  check_cuda(cudaEventSynchronize(queries_ready_), "cudaEventSynchronize");
  stats_.query_wait_seconds += seconds_since(start);
  balance();  // the last layer's events precede these queries
  start = Clock::now();
  const auto* bits = pinned_queries_.data<uint16_t>();
  const bool bf16 = whole.dtype == kc::ElementType::kBFloat16;
  for (int64_t i = 0; i < rows * row_elements; ++i) {
    queries_f32_[i] = bf16 ? kernels::bf16_to_float(bits[i]) : kernels::float16_to_float(bits[i]);
  }
  kcpu::Kv16AttentionParams p;
  p.q = queries_f32_.data();
  p.out = out;
  p.lse = lse;
  p.k_cache = cache.k_host.data<uint16_t>();
  p.v_cache = cache.v_host.data<uint16_t>();
  p.kv_type = bf16 ? kcpu::Kv16Type::kBFloat16 : kcpu::Kv16Type::kFloat16;
  p.kv_block_stride = whole.kv_block_stride;
  p.kv_token_stride = whole.kv_token_stride;
  p.kv_head_stride = whole.kv_head_stride;
  p.block_size = whole.block_size;
  p.block_table = cpu_table_.data();
  p.block_table_stride = cpu_table_stride_;
  p.cu_seqlens_q = cpu_cu_seqlens_.data();
  p.seqlens_kv = cpu_seqlens_.data();
  p.batch = static_cast<int32_t>(cpu_parts_.size());
  p.num_heads = whole.num_heads;
  p.num_kv_heads = whole.num_kv_heads;
  p.head_dim = whole.head_dim;
  p.softmax_scale = whole.softmax_scale;
  p.causal = whole.causal;
  p.num_threads = cpu_threads_;
  kcpu::kv16_attention(p);
  last_cpu_seconds_ = seconds_since(start);
  last_cpu_bytes_ = 0;
  for (const HostPart& part : cpu_parts_) {
    last_cpu_bytes_ += 2.0 * part.host_len * whole.kv_token_stride * sizeof(uint16_t);
  }
  stats_.cpu_seconds += last_cpu_seconds_;
  stats_.cpu_bytes += last_cpu_bytes_;

  // Back to the GPU and folded in. The pinned results are rewritten only by the next layer's
  // CPU part, which waits for its queries, queued after this copy.
  float* device =
      grow(cpu_results_, device_, rows * (row_elements + whole.num_heads) * sizeof(float))
          .data<float>();
  check_cuda(cudaMemcpyAsync(device, out, rows * (row_elements + whole.num_heads) * sizeof(float),
                             cudaMemcpyHostToDevice, stream_),
             "cudaMemcpyAsync(host-tier attention to GPU)");
  kc::merge_attention_part(whole.out, whole.lse, data_type(whole.dtype), device,
                           device + rows * row_elements, kc::DataType::kFloat32,
                           indices_.data<int32_t>() + cpu_tokens_, 0, rows, whole.num_heads,
                           whole.head_dim, stream_);
}

}  // namespace ftengine::cuda
