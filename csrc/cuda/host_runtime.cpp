// The host runtime of the CUDA backend: each op's CUDA implementation (input checks, the launches)
// and what they share: the cache of device-side tables (address columns, arrival counters, graph
// capture) and launch preparation. registration.cpp registers the ops (host_runtime.h); fake (meta)
// implementations are registered in Python (fastopt/backends/cuda.py). The kernels behind the
// launchers are in the .cu files (CUDA headers only, see kernels.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <algorithm>
#include <atomic>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../common/chunk_plan.h"
#include "../common/prefetch.h"
#include "host_runtime.h"
#include "kernels.h"

namespace fastopt {
namespace {

// --------------------------------------------------------------------------- input checks
// fastopt.ops validates every call before it reaches an op; these checks guard direct callers of
// torch.ops.fastopt.* and run before any tensor is touched.

DType dtype_code(at::ScalarType type, const char* name) {
  switch (type) {
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    default: TORCH_CHECK(false, "fastopt: ", name, " must be float16, bfloat16, float32 or float64, got ", type);
  }
}

DType dtype_code(const at::Tensor& t, const char* name) { return dtype_code(t.scalar_type(), name); }

// The TensorImpl of list[i], for prefetch::over_tensors: a list's tensors are visited with those a
// few ahead fetched meanwhile (each TensorImpl and storage is a heap object of its own: one cache
// miss after another otherwise, most of a call's host work over thousands of small tensors).
auto impl_of(const TensorRefs& list) {
  return [&list](size_t i) { return list.impl(i); };
}

// std::allocator, but resize() leaves new elements uninitialised: a column the scan below fills
// in whole is not zeroed first (five columns of thousands of entries per list, per call).
template <typename T>
struct Uninitialised : std::allocator<T> {
  template <typename U>
  struct rebind {
    using other = Uninitialised<U>;
  };
  template <typename U>
  void construct(U* p) noexcept {
    ::new (static_cast<void*>(p)) U;
  }
  template <typename U, typename... Args>
  void construct(U* p, Args&&... args) {
    ::new (static_cast<void*>(p)) U(std::forward<Args>(args)...);
  }
};
template <typename T>
using Column = std::vector<T, Uninitialised<T>>;

// What an op reads of each tensor of one of its lists, gathered by check_lists in one visit per
// tensor: the other checks, the table's key and its address column read these, not the tensors.
struct ListScan {
  const TensorRefs* tensors = nullptr;
  Column<DType> dtypes;
  Column<int64_t> numels;
  Column<int64_t> addresses;  // data_ptr(); 0 for a strided tensor (it runs on a copy)
  Column<uint8_t> contiguous;
  // Each TensorImpl whose version a write bumps after the launches (without reading the tensor
  // again); null for an inference tensor (it has no version counter) or a strided one (the copy
  // back from its stand-in bumps it).
  Column<c10::TensorImpl*> versioned;
  bool all_contiguous = true;
};

// Every list: as long as the first, each tensor defined, dense, floating and on the first one's
// (CUDA) device; returned, what was read of each list, in order.
using NamedLists = std::vector<std::pair<const char*, const TensorRefs*>>;
std::vector<ListScan> check_lists(const NamedLists& lists) {
  const TensorRefs& first = *lists.front().second;
  TORCH_CHECK(!first.empty(), "fastopt: ", lists.front().first, " must not be empty");
  TORCH_CHECK_TYPE(!first.front().unsafeGetTensorImpl()->is_python_dispatch(), "fastopt: ", lists.front().first,
                   "[0] is a tensor subclass that dispatches to Python: call the op through torch.ops");
  const at::Device device = first.front().device();
  TORCH_CHECK(device.type() == FASTOPT_OPS_DEVICE_TYPE, "fastopt: the CUDA backend needs CUDA tensors, got ", device);
  std::vector<ListScan> scans(lists.size());
  for (size_t l = 0; l < lists.size(); ++l) {
    const auto& [name, tensors] = lists[l];
    TORCH_CHECK(tensors->size() == first.size(), "fastopt: ", name, " has ", tensors->size(), " tensors but ",
                lists.front().first, " has ", first.size());
    const TensorRefs& list = *tensors;
    ListScan& scan = scans[l];
    const size_t n = list.size();
    scan.tensors = tensors;
    scan.dtypes.resize(n), scan.numels.resize(n), scan.addresses.resize(n), scan.contiguous.resize(n);
    scan.versioned.resize(n);
    // The TensorImpls only (TensorRefs::impl), never the tensors: their Python objects are a
    // cache miss each.
    prefetch::over_tensors(n, impl_of(list), true, [&, name = name](size_t i) {
      c10::TensorImpl* t = list.impl(i);
      TORCH_CHECK(t != c10::UndefinedTensorImpl::singleton(), "fastopt: ", name, "[", i, "] is undefined");
      // Through torch.ops such a tensor never gets here (its __torch_dispatch__ does); an eager
      // entry (registration.cpp) leaves it to torch.ops on this TypeError, raised before any write.
      TORCH_CHECK_TYPE(!t->is_python_dispatch(), "fastopt: ", name, "[", i,
                       "] is a tensor subclass that dispatches to Python: call the op through torch.ops");
      TORCH_CHECK(t->device() == device, "fastopt: ", name, "[", i, "] is on ", t->device(), " but ",
                  lists.front().first, "[0] is on ", device);
      TORCH_CHECK(t->layout() == at::kStrided, "fastopt: ", name, "[", i, "] must be a dense tensor");
      scan.dtypes[i] = dtype_code(c10::typeMetaToScalarType(t->dtype()), name);
      scan.numels[i] = t->numel();
      const bool contiguous = t->is_contiguous();
      scan.contiguous[i] = contiguous;
      scan.all_contiguous = scan.all_contiguous && contiguous;
      scan.addresses[i] = contiguous ? reinterpret_cast<int64_t>(t->mutable_data()) : 0;
      scan.versioned[i] = !contiguous || t->is_inference() ? nullptr : t;
    });
  }
  return scans;
}

void check_same_numels(const char* name, const ListScan& tensors, const char* reference_name,
                       const ListScan& reference) {
  if (tensors.numels == reference.numels) return;
  for (size_t i = 0; i < tensors.numels.size(); ++i)
    TORCH_CHECK(tensors.numels[i] == reference.numels[i], "fastopt: ", name, "[", i, "] has ", tensors.numels[i],
                " elements but ", reference_name, "[", i, "] has ", reference.numels[i]);
}

ScalarArg scalar_arg(double value, const std::optional<at::Tensor>& tensor, const at::Device& device,
                     const char* name) {
  if (!tensor.has_value()) return {value, nullptr, kFloat32};
  TORCH_CHECK(tensor->numel() == 1, "fastopt: ", name, " must hold one element, got shape ", tensor->sizes());
  TORCH_CHECK(tensor->device() == device, "fastopt: ", name, " is on ", tensor->device(),
              " but the tensors are on ", device);
  return {0.0, tensor->data_ptr(), dtype_code(*tensor, name)};
}

float* found_inf_pointer(const std::optional<at::Tensor>& found_inf, const at::Device& device) {
  if (!found_inf.has_value()) return nullptr;
  TORCH_CHECK(found_inf->numel() == 1 && found_inf->scalar_type() == at::kFloat,
              "fastopt: found_inf must be a 1-element float32 tensor");
  TORCH_CHECK(found_inf->device() == device, "fastopt: found_inf is on ", found_inf->device(),
              " but the tensors are on ", device);
  return found_inf->data_ptr<float>();
}

// --------------------------------------------------------------------------- the update ops' checks
// Shared by the ops and UpdatePlan (the same errors, raised before anything is written). A dtype
// combination without a kernel build raises NotImplementedError (the backend falls back on it).

// The lists' scans, in the op's order (params, grads, then its states).
std::vector<ListScan> check_adamw(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs,
                                  const TensorRefs& exp_avg_sqs, const TensorRefs& steps,
                                  const TensorRefs& max_exp_avg_sqs) {
  const bool amsgrad = !max_exp_avg_sqs.empty();
  NamedLists named = {
      {"params", &params}, {"grads", &grads}, {"exp_avgs", &exp_avgs}, {"exp_avg_sqs", &exp_avg_sqs}, {"steps", &steps}};
  if (amsgrad) named.emplace_back("max_exp_avg_sqs", &max_exp_avg_sqs);
  std::vector<ListScan> scans = check_lists(named);
  for (size_t l = 1; l < named.size(); ++l)
    if (l != 4) check_same_numels(named[l].first, scans[l], "params", scans[0]);  // not the steps (list 4)
  for (size_t i = 0; i < steps.size(); ++i)
    TORCH_CHECK(scans[4].numels[i] == 1 && (scans[4].dtypes[i] == kFloat32 || scans[4].dtypes[i] == kFloat64),
                "fastopt: steps[", i, "] must be a 1-element float32 or float64 tensor");
  // Every state of a param shares one dtype in the compiled combinations.
  for (size_t i = 0; i < params.size(); ++i) {
    const DType state = scans[2].dtypes[i];
    const bool same_states = scans[3].dtypes[i] == state && (!amsgrad || scans[5].dtypes[i] == state);
    TORCH_CHECK_NOT_IMPLEMENTED(
        same_states && adamw_supports(scans[0].dtypes[i], scans[1].dtypes[i], state),
        "fastopt: the CUDA AdamW kernel has no build for params ", params[i].scalar_type(), ", grads ",
        grads[i].scalar_type(), ", exp_avgs ", exp_avgs[i].scalar_type(), ", exp_avg_sqs ",
        exp_avg_sqs[i].scalar_type(), " (tensor ", i, ")");
  }
  return scans;
}

std::vector<ListScan> check_sgd(const TensorRefs& params, const TensorRefs& grads,
                                const TensorRefs& momentum_buffers) {
  const bool with_momentum = !momentum_buffers.empty();
  NamedLists named = {{"params", &params}, {"grads", &grads}};
  if (with_momentum) named.emplace_back("momentum_buffers", &momentum_buffers);
  std::vector<ListScan> scans = check_lists(named);
  check_same_numels("grads", scans[1], "params", scans[0]);
  if (with_momentum) check_same_numels("momentum_buffers", scans[2], "params", scans[0]);
  for (size_t i = 0; i < params.size(); ++i) {
    const DType param = scans[0].dtypes[i];
    TORCH_CHECK_NOT_IMPLEMENTED(
        sgd_supports(param, scans[1].dtypes[i], with_momentum ? scans[2].dtypes[i] : param),
        "fastopt: the CUDA SGD kernel has no build for params ", params[i].scalar_type(), ", grads ",
        grads[i].scalar_type(), with_momentum ? ", momentum_buffers " : "",
        with_momentum ? c10::toString(momentum_buffers[i].scalar_type()) : "", " (tensor ", i, ")");
  }
  return scans;
}

std::vector<ListScan> check_lion(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs) {
  std::vector<ListScan> scans = check_lists({{"params", &params}, {"grads", &grads}, {"exp_avgs", &exp_avgs}});
  check_same_numels("grads", scans[1], "params", scans[0]);
  check_same_numels("exp_avgs", scans[2], "params", scans[0]);
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK_NOT_IMPLEMENTED(
        lion_supports(scans[0].dtypes[i], scans[1].dtypes[i], scans[2].dtypes[i]),
        "fastopt: the CUDA Lion kernel has no build for params ", params[i].scalar_type(), ", grads ",
        grads[i].scalar_type(), ", exp_avgs ", exp_avgs[i].scalar_type(), " (tensor ", i, ")");
  return scans;
}

// --------------------------------------------------------------------------- dense stand-ins

// The kernels walk flat memory: a strided tensor runs on a contiguous copy, which an in-place op
// copies back afterwards (only those tensors pay for it).
// A tensor written in place gets a new version, as torch's in-place ops give it (autograd refuses a
// backward through a tensor changed since it was saved). Inference tensors have no version counter
// (bumping one would raise, after the writes).
// The tensors are borrowed (tensor_refs.h); only the copies are owned. Built from check_lists'
// scans, which hold what the table cache reads: the dtypes, the sizes and (with the copies' here)
// the address column.
using ListRefs = std::vector<const TensorRefs*>;
struct DenseLists {
  ListRefs lists;  // the op's own lists, but for those with a strided tensor: `stand_ins`
  std::deque<TensorRefs> stand_ins;  // such a list with a contiguous copy in place of each strided tensor
  std::vector<const ListScan*> scans;
  std::vector<int64_t> addresses;  // every list's, in order: the table's address column
  std::deque<at::Tensor> copies;  // a deque: lists point into it
  std::vector<std::pair<const at::Tensor*, const at::Tensor*>> write_back;  // (original, contiguous copy)
  std::vector<const ListScan*> written;  // the lists the kernels write (their versions are bumped)

  void add(const ListScan& scan, bool is_written) {
    const TensorRefs& tensors = *scan.tensors;
    scans.push_back(&scan);
    addresses.insert(addresses.end(), scan.addresses.begin(), scan.addresses.end());
    if (scan.all_contiguous) {
      lists.push_back(&tensors);
      if (is_written) written.push_back(&scan);
      return;
    }
    const size_t first = addresses.size() - tensors.size();
    TensorRefs& dense = stand_ins.emplace_back();
    dense.reserve(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      if (scan.contiguous[i]) {
        dense.push_back(&t);
      } else {
        copies.push_back(t.contiguous());
        dense.push_back(&copies.back());
        addresses[first + i] = reinterpret_cast<int64_t>(copies.back().data_ptr());
        if (is_written) write_back.emplace_back(&t, &copies.back());
      }
    }
    lists.push_back(&dense);
    if (is_written) written.push_back(&scan);
  }

  // After the launches: strided originals get their copies back (copy_ bumps their versions);
  // what the kernels wrote in place gets a new version (prefetch::bump_versions_of).
  void finish() {
    for (auto& [original, copy] : write_back) original->copy_(*copy);
    for (const ListScan* scan : written) prefetch::bump_versions_of(scan->versioned);
  }
};

// --------------------------------------------------------------------------- the table cache

// How tensors split into segments and groups; part of a table's identity.
enum class Segments : int64_t { kTensors = 0, kUnits = 1 };
// kDtypes: tensors grouped by their (param, grad, state) dtypes (lists 0, 1 and 2; without a list
// 2, the param's dtype stands for the state's), for the update kernels compiled per combination.
enum class Grouping : int64_t { kNone = 0, kDtypes = 1 };

int64_t group_key(DType param, DType grad, DType state) { return param * 16 + grad * 4 + state; }

int multiprocessor_count(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, int> counts;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = counts.find(device);
  if (found != counts.end()) return found->second;
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
  counts[device] = count;
  return count;
}

// The device-side table of one layout of tensor lists (dtypes, sizes, segmentation) on one
// stream: built once on the host from a ChunkPlan, uploaded in one async copy from pinned memory,
// and reused while the tensors keep their layout. Only the address column is rewritten when
// pointers change (grads re-allocated by zero_grad(set_to_none=True)).
//
// Streams: the stream is part of a table's key, so a table (address column and arrival counters)
// is only ever used on one stream, and its uses, rewrites and release are ordered by that stream.
// The same layout on two streams at once gets two tables.
//
// Arrival counters (the last-block protocol of the norm fold and of AdamW's step counts) are
// zeroed by a cudaMemsetAsync before each call's launches (captured into graphs as a memset node),
// so a launch that was aborted half-way cannot leave a later call wrong.
//
// CUDA graphs: a table used during stream capture is frozen: the graph replays launches that read
// it, so its addresses never change again. A capture never reuses an eager table and never records
// an upload: it gets a table of its own, built and uploaded right then with a synchronous copy on
// a private side stream (the capture mode of the calling thread relaxed for that copy), so its
// contents are valid before the graph first runs and the first call for a layout may come during
// capture. The graph holds a CUDA user object on each table it reads; when the graph (and every
// executable instantiated from it) is destroyed, the table is released at the next lookup.
struct Table {
  at::Tensor buffer;    // int64, device: addresses | dtypes | numels | chunk rows | segment rows | large segments
  at::Tensor arrivals;  // int32 per segment, zeroed before each call's launches
  DeviceTable view{};
  std::vector<ChunkGroup> groups;
  std::vector<int64_t> addresses;  // what the device copy of the address column holds
  int multiprocessors = 0;
  bool frozen = false;  // read by a captured graph: never re-pointed
  // Live graphs that read this table (decremented by the graphs' user objects on destruction).
  std::shared_ptr<std::atomic<int>> graphs = std::make_shared<std::atomic<int>>(0);
  std::vector<unsigned long long> captures;  // ids of the captures that retain it

  LaunchRange range(int64_t first_chunk, int64_t num_chunks) const {
    return {first_chunk, num_chunks, multiprocessors};
  }
  LaunchRange all_chunks() const { return range(0, view.num_chunks); }
};

// One async copy from pinned memory, stream-ordered after the launches that read the destination
// before; the pinned block goes back to torch's host allocator once the copy is done.
void upload(const at::Tensor& destination, const std::vector<int64_t>& values) {
  at::Tensor pinned = at::empty({static_cast<int64_t>(values.size())},
                                at::TensorOptions().dtype(at::kLong).pinned_memory(FASTOPT_OPS_PINNED));
  std::copy(values.begin(), values.end(), pinned.data_ptr<int64_t>());
  destination.copy_(pinned, /*non_blocking=*/true);
}

bool capturing() { return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None; }

// A non-blocking stream of our own per device (never a capturing one), for uploads during capture.
cudaStream_t side_stream(int device) {
  static std::mutex mutex;
  static std::unordered_map<int, cudaStream_t> streams;
  std::lock_guard<std::mutex> lock(mutex);
  auto found = streams.find(device);
  if (found != streams.end()) return found->second;
  cudaStream_t stream = nullptr;
  C10_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  streams[device] = stream;
  return stream;
}

// The upload of a table built during stream capture: done now, outside the graph (a synchronous
// copy on the side stream, with this thread's capture mode relaxed so that the copy and the wait
// are allowed), so the graph holds no upload and the table is valid before the graph first runs.
void upload_during_capture(const at::Tensor& destination, const std::vector<int64_t>& values) {
  cudaError_t error = cudaSuccess;
  {
    c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    const cudaStream_t stream = side_stream(destination.device().index());
    error = cudaMemcpyAsync(destination.data_ptr(), values.data(), values.size() * sizeof(int64_t),
                            cudaMemcpyHostToDevice, stream);
    if (error == cudaSuccess) error = cudaStreamSynchronize(stream);
  }
  if (error != cudaSuccess) {
    (void)cudaGetLastError();
    TORCH_CHECK(false, "fastopt: could not upload the device table of a new tensor layout during CUDA graph capture (",
                cudaGetErrorString(error), "); warm up first: run the step once outside capture, on the capture "
                "stream, before capturing");
  }
}

// Ties `table` to the graph being captured on `stream`: a user object whose destructor (run by
// CUDA when the graph and its executables are gone; it must not call CUDA) counts the graph out.
void retain_for_graph(Table& table, cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  unsigned long long id = 0;
  cudaGraph_t graph = nullptr;
  C10_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, &id, &graph));
  if (status != cudaStreamCaptureStatusActive || graph == nullptr) return;
  if (std::find(table.captures.begin(), table.captures.end(), id) != table.captures.end()) return;
  // None of these calls touches a stream; relaxed all the same, so that no capture mode can
  // count them as unsafe and invalidate the capture.
  c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
  auto* counter = new std::shared_ptr<std::atomic<int>>(table.graphs);
  cudaUserObject_t object = nullptr;
  const cudaHostFn_t release = [](void* data) {
    auto* held = static_cast<std::shared_ptr<std::atomic<int>>*>(data);
    (*held)->fetch_sub(1);
    delete held;
  };
  table.graphs->fetch_add(1);
  cudaError_t error = cudaUserObjectCreate(&object, counter, release, 1, cudaUserObjectNoDestructorSync);
  if (error == cudaSuccess) {
    error = cudaGraphRetainUserObject(graph, object, 1, cudaGraphUserObjectMove);
    if (error != cudaSuccess) cudaUserObjectRelease(object, 1);  // runs `release`
  } else {
    table.graphs->fetch_sub(1);
    delete counter;
  }
  if (error != cudaSuccess) {
    (void)cudaGetLastError();
    table.graphs->fetch_add(1);  // unknown lifetime: kept for the whole process, as a graph may read it
  }
  table.captures.push_back(id);
}

struct KeyHash {
  size_t operator()(const std::vector<int64_t>& key) const {
    size_t hash = key.size();
    for (int64_t value : key) hash ^= std::hash<int64_t>()(value) + 0x9e3779b97f4a7c15ULL + (hash << 6) + (hash >> 2);
    return hash;
  }
};

class TableCache {
 public:
  // The table for these (dense) lists on the current stream, pointing at their tensors. `units`
  // (Segments::kUnits): dim-0 slices of >= 2-D tensors of list 0 are segments; `min_one_chunk` as
  // in plan_chunks.
  std::shared_ptr<Table> lookup(const DenseLists& dense, Segments segments, Grouping grouping, bool min_one_chunk) {
    const ListRefs& lists = dense.lists;
    const TensorRefs& first = *lists.front();
    const int64_t num_tensors = static_cast<int64_t>(first.size());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
    std::vector<int64_t> key;
    key.reserve(6 + num_tensors * (segments == Segments::kUnits ? 3 : 2));
    key.insert(key.end(), {first.front().device().index(), reinterpret_cast<int64_t>(stream),
                           static_cast<int64_t>(lists.size()), static_cast<int64_t>(segments),
                           static_cast<int64_t>(grouping), min_one_chunk});
    // Each tensor's dtypes in every list, two bits a list (DType is 0..3), in one entry: a key a
    // third as long to hash and compare as one entry per list and tensor.
    static_assert(kFloat64 < 4, "a DType fits two bits");
    TORCH_INTERNAL_ASSERT(dense.scans.size() <= 32);
    const size_t dtypes_at = key.size();
    key.resize(dtypes_at + num_tensors, 0);
    for (size_t l = 0; l < dense.scans.size(); ++l) {
      const Column<DType>& dtypes = dense.scans[l]->dtypes;
      for (int64_t i = 0; i < num_tensors; ++i) key[dtypes_at + i] |= int64_t(dtypes[i]) << (2 * l);
    }
    const ListScan& sizes = *dense.scans.front();
    if (segments == Segments::kUnits) {
      for (int64_t i = 0; i < num_tensors; ++i) {
        key.push_back(sizes.numels[i]);
        key.push_back(first[i].dim() >= 2 ? first[i].size(0) : 1);
      }
    } else {
      key.insert(key.end(), sizes.numels.begin(), sizes.numels.end());
    }

    const bool capture = capturing();
    std::lock_guard<std::mutex> lock(mutex_);
    release_unused_graph_tables(capture);
    auto found = tables_.find(key);
    if (found != tables_.end()) {
      const Table& table = *found->second.table;
      // A capture takes only a table frozen for graphs that already points here; an eager call
      // any table that is not frozen, or a frozen one that points here.
      const bool usable = capture ? table.frozen && table.addresses == dense.addresses
                                  : !table.frozen || table.addresses == dense.addresses;
      if (!usable) {
        if (table.frozen) graph_only_.push_back(found->second.table);  // a graph still reads it
        recent_.erase(found->second.position);
        tables_.erase(found);
        found = tables_.end();
      }
    }
    std::shared_ptr<Table> table;
    if (found == tables_.end()) {
      recent_.push_front(key);
      table = std::make_shared<Table>(build(lists, segments, grouping, min_one_chunk, capture));
      tables_.emplace(std::move(key), Entry{table, recent_.begin()});
      if (tables_.size() > kCapacity) {  // the least recently used goes (callers may still hold it)
        const std::shared_ptr<Table>& oldest = tables_.at(recent_.back()).table;
        if (oldest->frozen) graph_only_.push_back(oldest);
        tables_.erase(recent_.back());
        recent_.pop_back();
      }
    } else {
      recent_.splice(recent_.begin(), recent_, found->second.position);
      table = found->second.table;
    }
    if (capture) {
      table->frozen = true;
      retain_for_graph(*table, stream);
    } else {
      point_to(*table, dense.addresses);  // a frozen table here already points to these tensors
    }
    return table;
  }

  // Test hooks (fastopt._C): what the cache holds, and every cached table's arrival counters set
  // to `value` on the current stream (as an aborted launch could leave them).
  CacheStats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    release_unused_graph_tables(capturing());
    CacheStats result;
    result.cached = static_cast<int64_t>(tables_.size());
    result.graph_only = static_cast<int64_t>(graph_only_.size());
    for (const auto& entry : tables_) result.graph_tables += entry.second.table->graphs->load() > 0;
    for (const auto& table : graph_only_) result.graph_tables += table->graphs->load() > 0;
    return result;
  }

  void set_arrival_counters(int value) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (const auto& entry : tables_) entry.second.table->arrivals.fill_(value);
  }

 private:
  static constexpr size_t kCapacity = 64;
  struct Entry {
    std::shared_ptr<Table> table;
    std::list<std::vector<int64_t>>::iterator position;
  };

  // Tables whose graphs are all gone: dropped when only graphs kept them, thawed when cached
  // (not during a capture, which may be about to retain them again).
  void release_unused_graph_tables(bool capture) {
    graph_only_.erase(std::remove_if(graph_only_.begin(), graph_only_.end(),
                                     [](const std::shared_ptr<Table>& t) { return t->graphs->load() == 0; }),
                      graph_only_.end());
    if (capture) return;
    for (auto& entry : tables_) {
      Table& table = *entry.second.table;
      if (table.frozen && table.graphs->load() == 0) {
        table.frozen = false;
        table.captures.clear();
      }
    }
  }

  // A table for these lists on the current stream (also for UpdatePlan, which keeps its own).
 public:
  static Table build(const ListRefs& lists, Segments segments, Grouping grouping, bool min_one_chunk,
                     bool capture) {
    const TensorRefs& first = *lists.front();
    const int64_t num_lists = static_cast<int64_t>(lists.size()), num_tensors = static_cast<int64_t>(first.size());
    std::vector<int64_t> numels(num_tensors), units, group_keys;
    for (int64_t i = 0; i < num_tensors; ++i) numels[i] = first[i].numel();
    if (segments == Segments::kUnits) {
      units.resize(num_tensors);
      for (int64_t i = 0; i < num_tensors; ++i) units[i] = first[i].dim() >= 2 ? first[i].size(0) : 1;
    }
    if (grouping == Grouping::kDtypes) {  // (param, grad, state) dtypes, the state being list 2's
      group_keys.resize(num_tensors);
      for (int64_t i = 0; i < num_tensors; ++i)
        group_keys[i] = group_key(dtype_code((*lists[0])[i], "params"), dtype_code((*lists[1])[i], "grads"),
                                  dtype_code((*lists[num_lists > 2 ? 2 : 0])[i], "states"));
    }
    const ChunkPlan plan = plan_chunks(numels, units, group_keys, kChunkSize, min_one_chunk);
    const int64_t num_chunks = plan.num_chunks(), num_segments = plan.num_segments();
    std::vector<int64_t> large_segments;
    for (int64_t s = 0; s < num_segments; ++s)
      if (plan.segment_num_chunks[s] > kWarpFoldChunks) large_segments.push_back(s);
    const int64_t num_large_segments = static_cast<int64_t>(large_segments.size());

    // One host buffer, one upload: addresses | dtypes | numels | chunks | segments | large segments.
    std::vector<int64_t> host = addresses_of(lists);
    host.resize(2 * num_lists * num_tensors);
    for (int64_t l = 0; l < num_lists; ++l)
      for (int64_t i = 0; i < num_tensors; ++i) host[(num_lists + l) * num_tensors + i] = dtype_code((*lists[l])[i], "tensor");
    host.insert(host.end(), numels.begin(), numels.end());
    for (const auto* column : {&plan.chunk_tensor, &plan.chunk_segment, &plan.chunk_start, &plan.chunk_end,
                               &plan.segment_tensor, &plan.segment_first_chunk, &plan.segment_num_chunks,
                               static_cast<const std::vector<int64_t>*>(&large_segments)})
      host.insert(host.end(), column->begin(), column->end());

    Table table;
    table.addresses.assign(host.begin(), host.begin() + num_lists * num_tensors);
    const at::Device device = first.front().device();
    table.buffer = at::empty({static_cast<int64_t>(host.size())}, at::TensorOptions().dtype(at::kLong).device(device));
    if (capture) {
      upload_during_capture(table.buffer, host);
    } else {
      upload(table.buffer, host);
    }
    table.arrivals = at::empty({std::max<int64_t>(num_segments, 1)}, at::TensorOptions().dtype(at::kInt).device(device));
    table.groups = plan.groups;
    table.multiprocessors = multiprocessor_count(device.index());

    const int64_t* base = table.buffer.data_ptr<int64_t>();
    DeviceTable& view = table.view;
    view.addresses = base;
    view.dtypes = base + num_lists * num_tensors;
    view.numels = base + 2 * num_lists * num_tensors;
    view.chunk_tensor = view.numels + num_tensors;
    view.chunk_segment = view.chunk_tensor + num_chunks;
    view.chunk_start = view.chunk_segment + num_chunks;
    view.chunk_end = view.chunk_start + num_chunks;
    view.segment_tensor = view.chunk_end + num_chunks;
    view.segment_first_chunk = view.segment_tensor + num_segments;
    view.segment_num_chunks = view.segment_first_chunk + num_segments;
    view.large_segments = view.segment_num_chunks + num_segments;
    view.num_lists = num_lists;
    view.num_tensors = num_tensors;
    view.num_chunks = num_chunks;
    view.num_segments = num_segments;
    view.num_large_segments = num_large_segments;
    return table;
  }

 private:
  static std::vector<int64_t> addresses_of(const ListRefs& lists) {
    std::vector<int64_t> addresses;
    addresses.reserve(lists.size() * lists.front()->size());
    for (const TensorRefs* list : lists) {
      const TensorRefs& tensors = *list;
      prefetch::over_tensors(tensors.size(), impl_of(tensors), true, [&](size_t i) {
        addresses.push_back(reinterpret_cast<int64_t>(tensors.impl(i)->mutable_data()));
      });
    }
    return addresses;
  }

  // Refresh the device address column when any pointer changed (eager calls on the table's stream
  // only: ordered after every launch that read the old column).
  static void point_to(Table& table, const std::vector<int64_t>& addresses) {
    if (addresses == table.addresses) return;
    upload(table.buffer.narrow(0, 0, static_cast<int64_t>(addresses.size())), addresses);
    table.addresses = addresses;
  }

  std::mutex mutex_;
  std::unordered_map<std::vector<int64_t>, Entry, KeyHash> tables_;
  std::list<std::vector<int64_t>> recent_;  // most recently used first
  std::vector<std::shared_ptr<Table>> graph_only_;  // replaced or evicted tables that a live graph reads
};

TableCache& tables() {
  static TableCache cache;
  return cache;
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// launch(range, param, grad, state) for each dtype group of a Grouping::kDtypes table: one launch
// per (param, grad, state) combination present.
template <typename Launch>
void launch_per_dtype_group(const Table& table, Launch&& launch) {
  for (const ChunkGroup& group : table.groups) {
    launch(table.range(group.first_chunk, group.num_chunks), static_cast<DType>(group.key / 16),
           static_cast<DType>(group.key / 4 % 4), static_cast<DType>(group.key % 4));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// --------------------------------------------------------------------------- the ops

// The norm pass over a table's list 0: per-chunk partials (with the inf/nan check into found_inf
// and, with `unscale`, the in-place unscale), then the fold into the total and per-tensor norms.
// kind == kNoNorm: the check and unscale alone (one launch); returns empty tensors then.
std::tuple<at::Tensor, at::Tensor> run_norm_pass(const Table& table, const at::Tensor& like, NormKind kind, double p,
                                                 bool per_tensor, float* found_inf, bool unscale, ScalarArg inv_scale) {
  const at::TensorOptions floats = like.options().dtype(at::kFloat);
  const bool with_norm = kind != kNoNorm;
  // The chunks' partials, then the fold's per-block totals.
  const at::Tensor scratch =
      at::empty({with_norm ? table.view.num_chunks + kMaxFinishBlocks : 0}, like.options().dtype(at::kDouble));
  double* partials = with_norm ? scratch.data_ptr<double>() : nullptr;
  at::Tensor total = with_norm ? at::empty({}, floats) : at::empty({0}, floats);
  at::Tensor norms = at::empty({with_norm && per_tensor ? table.view.num_tensors : 0}, floats);
  const cudaStream_t stream = current_stream();
  launch_norm_partials(table.view, table.all_chunks(), 0, kind, p, partials, found_inf, unscale, inv_scale, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (with_norm) {
    launch_norm_finish(table.view, partials, kind, p, per_tensor ? norms.data_ptr<float>() : nullptr,
                       total.data_ptr<float>(), partials + table.view.num_chunks, table.arrivals.data_ptr<int>(),
                       table.multiprocessors, stream);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {total, norms};
}

}  // namespace

// The ops, as registration.cpp registers them (declared in host_runtime.h).

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm(const TensorRefs& tensors, double norm_type, bool per_tensor,
                                                     const std::optional<at::Tensor>& found_inf) {
  const std::vector<ListScan> scans = check_lists({{"tensors", &tensors}});
  TORCH_CHECK(norm_type > 0, "fastopt: norm_type must be positive or inf, got ", norm_type);
  const at::Device device = tensors.front().device();
  c10::cuda::CUDAGuard guard(device);
  float* found_inf_data = found_inf_pointer(found_inf, device);
  DenseLists dense;
  dense.add(scans[0], /*written=*/false);
  const std::shared_ptr<Table> table = tables().lookup(dense, Segments::kTensors, Grouping::kNone, false);
  return run_norm_pass(*table, tensors.front(), norm_kind(norm_type), norm_type, per_tensor, found_inf_data, false,
                       {1.0, nullptr, kFloat32});
}

// The in-place unscale with the inf/nan check; with norm_type, also the norm of the unscaled
// tensors (total, and per tensor when asked) from the same read: the AMP step's first pass.
std::tuple<at::Tensor, at::Tensor> unscale_and_check_(const TensorRefs& tensors, double inv_scale,
                                                      const std::optional<at::Tensor>& inv_scale_tensor,
                                                      const at::Tensor& found_inf, std::optional<double> norm_type,
                                                      bool per_tensor) {
  const std::vector<ListScan> scans = check_lists({{"tensors", &tensors}});
  TORCH_CHECK(!norm_type.has_value() || *norm_type > 0, "fastopt: norm_type must be positive or inf, got ", *norm_type);
  const at::Device device = tensors.front().device();
  c10::cuda::CUDAGuard guard(device);
  const ScalarArg factor = scalar_arg(inv_scale, inv_scale_tensor, device, "inv_scale");
  float* found_inf_data = found_inf_pointer(found_inf, device);
  DenseLists dense;
  dense.add(scans[0], /*written=*/true);
  const std::shared_ptr<Table> table = tables().lookup(dense, Segments::kTensors, Grouping::kNone, false);
  auto result = run_norm_pass(*table, tensors.front(), norm_type.has_value() ? norm_kind(*norm_type) : kNoNorm,
                              norm_type.value_or(2.0), per_tensor, found_inf_data, true, factor);
  dense.finish();
  return result;
}

void scale_(const TensorRefs& tensors, double coef, const std::optional<at::Tensor>& coef_tensor) {
  const std::vector<ListScan> scans = check_lists({{"tensors", &tensors}});
  const at::Device device = tensors.front().device();
  c10::cuda::CUDAGuard guard(device);
  const ScalarArg factor = scalar_arg(coef, coef_tensor, device, "coef");
  DenseLists dense;
  dense.add(scans[0], /*written=*/true);
  const std::shared_ptr<Table> table = tables().lookup(dense, Segments::kTensors, Grouping::kNone, false);
  launch_scale(table->view, table->all_chunks(), 0, factor, nullptr, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dense.finish();
}

void clamp_(const TensorRefs& tensors, double clip_value) {
  const std::vector<ListScan> scans = check_lists({{"tensors", &tensors}});
  TORCH_CHECK(clip_value >= 0, "fastopt: clip_value must be >= 0, got ", clip_value);
  const at::Device device = tensors.front().device();
  c10::cuda::CUDAGuard guard(device);
  DenseLists dense;
  dense.add(scans[0], /*written=*/true);
  const std::shared_ptr<Table> table = tables().lookup(dense, Segments::kTensors, Grouping::kNone, false);
  launch_clamp(table->view, table->all_chunks(), clip_value, current_stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dense.finish();
}

void adaptive_clip_(const TensorRefs& params, const TensorRefs& grads, double clip_factor, double eps, double norm_type,
                    bool unitwise) {
  const std::vector<ListScan> scans = check_lists({{"params", &params}, {"grads", &grads}});
  check_same_numels("grads", scans[1], "params", scans[0]);
  TORCH_CHECK(norm_type > 0, "fastopt: norm_type must be positive or inf, got ", norm_type);
  const at::Device device = params.front().device();
  c10::cuda::CUDAGuard guard(device);
  DenseLists dense;
  dense.add(scans[0], /*written=*/false);
  dense.add(scans[1], /*written=*/true);
  const std::shared_ptr<Table> table = tables().lookup(dense, unitwise ? Segments::kUnits : Segments::kTensors, Grouping::kNone, false);
  if (table->view.num_chunks == 0) return;  // only empty grads
  const NormKind kind = norm_kind(norm_type);
  const at::TensorOptions doubles = params.front().options().dtype(at::kDouble);
  const at::Tensor partials = at::empty({2 * table->view.num_chunks}, doubles);
  const at::Tensor coefficients = at::empty({table->view.num_segments}, doubles);
  const cudaStream_t stream = current_stream();
  launch_pair_norm_partials(table->view, table->all_chunks(), kind, norm_type, partials.data_ptr<double>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_agc_coefficients(table->view, partials.data_ptr<double>(), kind, norm_type, clip_factor, eps,
                          coefficients.data_ptr<double>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  launch_scale(table->view, table->all_chunks(), 1, {1.0, nullptr, kFloat32}, coefficients.data_ptr<double>(), stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  dense.finish();
}

// One update pass over a table (an op's, or an UpdatePlan's): a launch per dtype group.
void run_adamw_pass(const Table& table, AdamWArgs args, cudaStream_t stream) {
  args.arrivals = table.arrivals.data_ptr<int>();
  // Counters start at zero whatever an earlier (possibly aborted) launch left.
  C10_CUDA_CHECK(cudaMemsetAsync(args.arrivals, 0, table.arrivals.numel() * sizeof(int), stream));
  launch_per_dtype_group(table, [&](LaunchRange range, DType param, DType grad, DType state) {
    launch_adamw(table.view, range, param, grad, state, args, stream);
  });
}

void run_sgd_pass(const Table& table, const SGDArgs& args, cudaStream_t stream) {
  launch_per_dtype_group(table, [&](LaunchRange range, DType param, DType grad, DType state) {
    launch_sgd(table.view, range, param, grad, state, args, stream);
  });
}

void run_lion_pass(const Table& table, const LionArgs& args, cudaStream_t stream) {
  launch_per_dtype_group(table, [&](LaunchRange range, DType param, DType grad, DType state) {
    launch_lion(table.view, range, param, grad, state, args, stream);
  });
}

void adamw_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs, const TensorRefs& exp_avg_sqs,
            const TensorRefs& steps, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2,
            double eps, double weight_decay, bool maximize, const TensorRefs& max_exp_avg_sqs, double grad_scale,
            const std::optional<at::Tensor>& grad_scale_tensor, const std::optional<at::Tensor>& found_inf,
            double clip_coef, const std::optional<at::Tensor>& clip_coef_tensor, bool decoupled_weight_decay) {
  const bool amsgrad = !max_exp_avg_sqs.empty();
  const std::vector<ListScan> scans = check_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, max_exp_avg_sqs);
  const at::Device device = params.front().device();
  c10::cuda::CUDAGuard guard(device);
  AdamWArgs args{};
  args.lr = scalar_arg(lr, lr_tensor, device, "lr");
  args.grad_scale = scalar_arg(grad_scale, grad_scale_tensor, device, "grad_scale");
  args.clip_coef = scalar_arg(clip_coef, clip_coef_tensor, device, "clip_coef");
  args.found_inf = found_inf_pointer(found_inf, device);
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.maximize = maximize;
  args.amsgrad = amsgrad;
  args.decoupled_weight_decay = decoupled_weight_decay;
  DenseLists dense;
  dense.add(scans[0], true);
  dense.add(scans[1], false);
  dense.add(scans[2], true);
  dense.add(scans[3], true);
  dense.add(scans[4], true);
  if (amsgrad) dense.add(scans[5], true);
  const std::shared_ptr<Table> table = tables().lookup(dense, Segments::kTensors, Grouping::kDtypes, /*min_one_chunk=*/true);
  run_adamw_pass(*table, args, current_stream());
  dense.finish();
}

void sgd_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& momentum_buffers, double lr,
          const std::optional<at::Tensor>& lr_tensor, double momentum, double dampening, double weight_decay,
          bool nesterov, bool maximize, bool first_step, double grad_scale,
          const std::optional<at::Tensor>& grad_scale_tensor, const std::optional<at::Tensor>& found_inf,
          double clip_coef, const std::optional<at::Tensor>& clip_coef_tensor) {
  const bool with_momentum = !momentum_buffers.empty();
  const std::vector<ListScan> scans = check_sgd(params, grads, momentum_buffers);
  const at::Device device = params.front().device();
  c10::cuda::CUDAGuard guard(device);
  SGDArgs args{};
  args.lr = scalar_arg(lr, lr_tensor, device, "lr");
  args.grad_scale = scalar_arg(grad_scale, grad_scale_tensor, device, "grad_scale");
  args.clip_coef = scalar_arg(clip_coef, clip_coef_tensor, device, "clip_coef");
  args.found_inf = found_inf_pointer(found_inf, device);
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.nesterov = nesterov;
  args.maximize = maximize;
  args.momentum_buffers = with_momentum;
  args.first_step = first_step;
  DenseLists dense;
  dense.add(scans[0], true);
  dense.add(scans[1], false);
  if (with_momentum) dense.add(scans[2], true);
  const std::shared_ptr<Table> table = tables().lookup(dense, Segments::kTensors, Grouping::kDtypes, false);
  run_sgd_pass(*table, args, current_stream());
  dense.finish();
}

void lion_(const TensorRefs& params, const TensorRefs& grads, const TensorRefs& exp_avgs, double lr,
           const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double weight_decay, bool maximize,
           double grad_scale, const std::optional<at::Tensor>& grad_scale_tensor,
           const std::optional<at::Tensor>& found_inf, double clip_coef,
           const std::optional<at::Tensor>& clip_coef_tensor) {
  const std::vector<ListScan> scans = check_lion(params, grads, exp_avgs);
  const at::Device device = params.front().device();
  c10::cuda::CUDAGuard guard(device);
  LionArgs args{};
  args.lr = scalar_arg(lr, lr_tensor, device, "lr");
  args.grad_scale = scalar_arg(grad_scale, grad_scale_tensor, device, "grad_scale");
  args.clip_coef = scalar_arg(clip_coef, clip_coef_tensor, device, "clip_coef");
  args.found_inf = found_inf_pointer(found_inf, device);
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.weight_decay = weight_decay;
  args.maximize = maximize;
  DenseLists dense;
  dense.add(scans[0], true);
  dense.add(scans[1], false);
  dense.add(scans[2], true);
  const std::shared_ptr<Table> table = tables().lookup(dense, Segments::kTensors, Grouping::kDtypes, false);
  run_lion_pass(*table, args, current_stream());
  dense.finish();
}

// --------------------------------------------------------------------------- UpdatePlan

// What a plan keeps: the params and states (the table's lists but the grads, list 1), the
// params' addresses, dtypes and sizes, the planned grad dtypes, and a table per stream (the
// cache's rule: a table is only ever used on one stream, so its address column is rewritten in
// that stream's order; the caching allocator frees its buffer in that order too). The tables
// are the plan's own, never in the cache and never captured (a capturing call takes the op), so no
// graph reads them and they need no freezing.
// A planned step's scalars, checked and read on the plan's device before anything is written.
struct PlannedStepScalars {
  const PlannedScalars& given;
  ScalarArg lr, grad_scale, clip_coef;
  float* found_inf;

  PlannedStepScalars(const PlannedScalars& scalars, const at::Device& device)
      : given(scalars),
        lr(scalar_arg(scalars.lr, scalars.lr_tensor, device, "lr")),
        grad_scale(scalar_arg(scalars.grad_scale, scalars.grad_scale_tensor, device, "grad_scale")),
        clip_coef(scalar_arg(scalars.clip_coef, scalars.clip_coef_tensor, device, "clip_coef")),
        found_inf(found_inf_pointer(scalars.found_inf, device)) {}
};

struct UpdatePlan::State {
  PlannedOp op;
  std::vector<TensorList> fixed;      // lists 0, 2, 3, ... of the table (params, states)
  std::vector<int64_t> param_addresses;
  std::vector<at::ScalarType> param_types, grad_types;
  std::vector<int64_t> numels;
  at::Device device{at::kCPU};
  int64_t num_tensors = 0;
  bool amsgrad = false, with_momentum = false;
  std::unordered_map<cudaStream_t, std::unique_ptr<Table>> tables;
  std::vector<int64_t> grad_addresses;  // this call's
  // The version counters of the params and states, each once (prefetch::distinct_versions): bumped
  // after the launches, fetched ahead (each a heap object of its own: one miss per tensor otherwise).
  std::vector<c10::VariableVersion> versions;

  // One planned step's launches over the plan's table for this stream, its grads' row pointed at
  // grad_addresses first (an upload only when they moved); then the version bumps.
  void run(Table& table, const PlannedStepScalars& step, cudaStream_t stream);
};

UpdatePlan::UpdatePlan(PlannedOp op, const TensorList& params, const TensorList& grads,
                       const std::vector<TensorList>& states)
    : state_(std::make_unique<State>()) {
  State& s = *state_;
  s.op = op;
  const TensorList none;
  auto state_list = [&](size_t k) { return TensorRefs(k < states.size() ? states[k] : none); };
  const TensorRefs param_refs(params), grad_refs(grads);
  switch (op) {
    case PlannedOp::kAdamW:
      check_adamw(param_refs, grad_refs, state_list(0), state_list(1), state_list(2), state_list(3));
      s.amsgrad = !state_list(3).empty();
      break;
    case PlannedOp::kSGD:
      check_sgd(param_refs, grad_refs, state_list(0));
      s.with_momentum = !state_list(0).empty();
      break;
    case PlannedOp::kLion:
      check_lion(param_refs, grad_refs, state_list(0));
      break;
  }
  s.fixed.push_back(params);
  for (const TensorList& list : states)
    if (!list.empty()) s.fixed.push_back(list);
  s.num_tensors = static_cast<int64_t>(params.size());
  s.device = params.front().device();
  for (const TensorList& list : s.fixed)
    for (size_t i = 0; i < list.size(); ++i)
      TORCH_CHECK(list[i].is_contiguous(), "fastopt: UpdatePlan: tensor ", i, " of a list is not contiguous");
  for (size_t i = 0; i < grads.size(); ++i)
    TORCH_CHECK(grads[i].is_contiguous(), "fastopt: UpdatePlan: grads[", i, "] is not contiguous");
  for (size_t i = 0; i < params.size(); ++i) {
    s.param_addresses.push_back(reinterpret_cast<int64_t>(params[i].const_data_ptr()));
    s.param_types.push_back(params[i].scalar_type());
    s.grad_types.push_back(grads[i].scalar_type());
    s.numels.push_back(params[i].numel());
  }
  s.grad_addresses.resize(params.size());
  std::vector<c10::TensorImpl*> written;
  for (const TensorList& list : s.fixed)
    for (const at::Tensor& t : list) written.push_back(t.unsafeGetTensorImpl());
  s.versions = prefetch::distinct_versions(written);
}

UpdatePlan::~UpdatePlan() = default;

PlanStatus UpdatePlan::step(const TensorRefs& grads, const PlannedScalars& scalars) {
  State& s = *state_;
  const int64_t n = s.num_tensors;
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "fastopt: grads has ", grads.size(), " tensors but params has ",
              n);
  const at::Device device = s.device;
  c10::cuda::CUDAGuard guard(device);
  if (capturing()) return PlanStatus::kUnplanned;
  // The params where the plan found them (p.data = x moves a param: plan again). The states are
  // trusted to keep their storage, as the step plan trusts them (it makes a new plan when they
  // change): reading 3-4 more tensors per param would cost more than all of the rest.
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& p = s.fixed[0][i];
    if (reinterpret_cast<int64_t>(p.const_data_ptr()) != s.param_addresses[i] || p.scalar_type() != s.param_types[i] ||
        p.numel() != s.numels[i])
      return PlanStatus::kReplan;
  }
  // The grads: the op's errors for what it would refuse; a new dtype or a strided grad re-plans.
  bool replan = false;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.defined(), "fastopt: grads[", i, "] is undefined");
    TORCH_CHECK(g.device() == device, "fastopt: grads[", i, "] is on ", g.device(), " but params[0] is on ", device);
    TORCH_CHECK(g.layout() == at::kStrided, "fastopt: grads[", i, "] must be a dense tensor");
    TORCH_CHECK(g.numel() == s.numels[i], "fastopt: grads[", i, "] has ", g.numel(), " elements but params[", i,
                "] has ", s.numels[i]);
    replan |= g.scalar_type() != s.grad_types[i] || !g.is_contiguous();
    s.grad_addresses[i] = reinterpret_cast<int64_t>(g.const_data_ptr());
  }
  if (replan) return PlanStatus::kReplan;
  const PlannedStepScalars step_scalars(scalars, device);  // checked before anything is written

  // Every check has passed: from here on, the table and the launches.
  const cudaStream_t stream = current_stream();
  std::unique_ptr<Table>& slot = s.tables[stream];
  if (!slot) {
    std::deque<TensorRefs> fixed;  // the plan's params and states, as lists of references
    ListRefs lists;
    lists.push_back(&fixed.emplace_back(s.fixed[0]));
    lists.push_back(&grads);
    for (size_t l = 1; l < s.fixed.size(); ++l) lists.push_back(&fixed.emplace_back(s.fixed[l]));
    slot = std::make_unique<Table>(TableCache::build(lists, Segments::kTensors, Grouping::kDtypes,
                                                     /*min_one_chunk=*/s.op == PlannedOp::kAdamW, false));
  }
  s.run(*slot, step_scalars, stream);
  return PlanStatus::kDone;
}

PlanStatus UpdatePlan::step_addresses(const at::Tensor& grad_addresses, const PlannedScalars& scalars) {
  State& s = *state_;
  const int64_t n = s.num_tensors;
  TORCH_CHECK(grad_addresses.device().is_cpu() && grad_addresses.scalar_type() == at::kLong &&
                  grad_addresses.is_contiguous() && grad_addresses.numel() == n,
              "fastopt: UpdatePlan: the grads' addresses must be a contiguous CPU int64 tensor of ", n, " elements");
  c10::cuda::CUDAGuard guard(s.device);
  if (capturing()) return PlanStatus::kUnplanned;
  const PlannedStepScalars step_scalars(scalars, s.device);
  const cudaStream_t stream = current_stream();
  const auto found = s.tables.find(stream);
  if (found == s.tables.end()) return PlanStatus::kNeedsGrads;
  const int64_t* addresses = grad_addresses.const_data_ptr<int64_t>();
  std::copy(addresses, addresses + n, s.grad_addresses.begin());
  s.run(*found->second, step_scalars, stream);
  return PlanStatus::kDone;
}

void UpdatePlan::State::run(Table& table, const PlannedStepScalars& step, cudaStream_t stream) {
  State& s = *this;
  const int64_t n = s.num_tensors;
  if (!std::equal(s.grad_addresses.begin(), s.grad_addresses.end(), table.addresses.begin() + n)) {
    // Only the grads' row (list 1) changes; stream-ordered after the launches that read it before.
    upload(table.buffer.narrow(0, n, n), s.grad_addresses);
    std::copy(s.grad_addresses.begin(), s.grad_addresses.end(), table.addresses.begin() + n);
  }
  const PlannedScalars& scalars = step.given;
  const ScalarArg lr = step.lr, grad_scale = step.grad_scale, clip_coef = step.clip_coef;
  float* found_inf = step.found_inf;
  switch (s.op) {
    case PlannedOp::kAdamW: {
      AdamWArgs args{};
      args.lr = lr, args.grad_scale = grad_scale, args.clip_coef = clip_coef, args.found_inf = found_inf;
      args.beta1 = scalars.beta1, args.beta2 = scalars.beta2, args.eps = scalars.eps;
      args.weight_decay = scalars.weight_decay, args.maximize = scalars.maximize, args.amsgrad = s.amsgrad;
      args.decoupled_weight_decay = scalars.decoupled_weight_decay;
      run_adamw_pass(table, args, stream);
      break;
    }
    case PlannedOp::kSGD: {
      SGDArgs args{};
      args.lr = lr, args.grad_scale = grad_scale, args.clip_coef = clip_coef, args.found_inf = found_inf;
      args.momentum = scalars.momentum, args.dampening = scalars.dampening, args.weight_decay = scalars.weight_decay;
      args.nesterov = scalars.nesterov, args.maximize = scalars.maximize;
      args.momentum_buffers = s.with_momentum, args.first_step = scalars.first_step;
      run_sgd_pass(table, args, stream);
      break;
    }
    case PlannedOp::kLion: {
      LionArgs args{};
      args.lr = lr, args.grad_scale = grad_scale, args.clip_coef = clip_coef, args.found_inf = found_inf;
      args.beta1 = scalars.beta1, args.beta2 = scalars.beta2, args.weight_decay = scalars.weight_decay;
      args.maximize = scalars.maximize;
      run_lion_pass(table, args, stream);
      break;
    }
  }
  prefetch::bump_versions(s.versions);  // what the pass wrote (the grads are only read)
}

// --------------------------------------------------------------------------- NormPlan

struct NormPlan::State {
  at::Tensor like;  // an empty tensor on the grads' device, for the outputs' options
  std::vector<int64_t> numels;
  std::unordered_map<cudaStream_t, std::unique_ptr<Table>> tables;
  std::vector<int64_t> addresses;  // this call's, scratch
};

NormPlan::NormPlan(const TensorList& grads) : state_(std::make_unique<State>()) {
  State& s = *state_;
  const TensorRefs grad_refs(grads);
  check_lists({{"tensors", &grad_refs}});
  for (size_t i = 0; i < grads.size(); ++i)
    TORCH_CHECK(grads[i].is_contiguous(), "fastopt: NormPlan: tensors[", i, "] is not contiguous");
  const at::Device device = grads.front().device();
  c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(!capturing(), "fastopt: NormPlan: made during CUDA-graph capture (warm up first)");
  s.like = at::empty({0}, grads.front().options());
  for (const at::Tensor& g : grads) s.numels.push_back(g.numel());
  s.addresses.resize(grads.size());
  s.tables[current_stream()] =
      std::make_unique<Table>(TableCache::build({&grad_refs}, Segments::kTensors, Grouping::kNone, false, false));
}

NormPlan::~NormPlan() = default;

std::optional<std::tuple<at::Tensor, at::Tensor>> NormPlan::norm(const at::Tensor& addresses, double norm_type,
                                                                 bool per_tensor,
                                                                 const std::optional<at::Tensor>& found_inf) {
  State& s = *state_;
  const int64_t n = static_cast<int64_t>(s.numels.size());
  TORCH_CHECK(addresses.device().is_cpu() && addresses.scalar_type() == at::kLong && addresses.is_contiguous() &&
                  addresses.numel() == n,
              "fastopt: NormPlan: the addresses must be a contiguous CPU int64 tensor of ", n, " elements");
  TORCH_CHECK(norm_type > 0, "fastopt: norm_type must be positive or inf, got ", norm_type);
  const at::Device device = s.like.device();
  c10::cuda::CUDAGuard guard(device);
  if (capturing()) return std::nullopt;
  float* found_inf_data = found_inf_pointer(found_inf, device);
  const auto found = s.tables.find(current_stream());
  if (found == s.tables.end()) return std::nullopt;
  Table& table = *found->second;
  const int64_t* given = addresses.const_data_ptr<int64_t>();
  if (!std::equal(given, given + n, table.addresses.begin())) {  // stream-ordered after the last call's reads
    s.addresses.assign(given, given + n);
    upload(table.buffer.narrow(0, 0, n), s.addresses);
    table.addresses = s.addresses;
  }
  return run_norm_pass(table, s.like, norm_kind(norm_type), norm_type, per_tensor, found_inf_data, false,
                       {1.0, nullptr, kFloat32});
}

// Test hooks (fastopt._C._table_cache_stats, _set_arrival_counters; registration.cpp).
CacheStats table_cache_stats() { return tables().stats(); }

void set_arrival_counters(int value) { tables().set_arrival_counters(value); }

}  // namespace fastopt
