// Unit tests of the emulated device (csrc/emulation/runtime.cpp) with small kernels of their own:
// barriers and block reductions in shared memory, warp shuffles and votes, the last-block-arrives
// pattern, CUB's block and warp reductions, per-block shared memory, and the failures a GPU would
// show (deadlock at a barrier, threads at different barriers, a warp collective naming an exited
// lane). Compiled as C++ with -include cuda_emulation.h; `nvcc` would compile the kernels too.
//
// Usage: test_runtime [name]   (no name: every test; `race-*` names are the planted races that
// the TSan build must report, run one at a time by run_checks.sh).
#include <chrono>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include <cub/block/block_reduce.cuh>
#include <cub/warp/warp_reduce.cuh>

namespace {

int failures = 0;
#define EXPECT(cond, ...)                                                  \
  do {                                                                     \
    if (!(cond)) {                                                         \
      ++failures;                                                          \
      std::fprintf(stderr, "%s:%d: FAILED: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                   \
      std::fprintf(stderr, "\n");                                          \
    }                                                                      \
  } while (0)

// ------------------------------------------------------------------------------------ kernels
constexpr int kThreads = 256;

// A tree reduction in shared memory: one barrier per level.
__global__ void block_sum_kernel(const double* in, double* out, int n) {
  __shared__ double partial[kThreads];
  double sum = 0.0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) sum += in[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < static_cast<unsigned>(stride)) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// The same without the barrier inside the tree: a shared-memory race (TSan must report it).
__global__ void block_sum_racy_kernel(const double* in, double* out, int n) {
  __shared__ double partial[kThreads];
  double sum = 0.0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) sum += in[i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < static_cast<unsigned>(stride)) partial[threadIdx.x] += partial[threadIdx.x + stride];
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// Butterfly over the warp: every lane ends with the warp's sum.
__global__ void warp_xor_kernel(const float* in, float* out) {
  float v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}

__global__ void shuffle_kinds_kernel(int* out) {
  const int lane = threadIdx.x % 32;
  const int base = threadIdx.x * 4;
  out[base + 0] = __shfl_sync(0xffffffffu, lane * 10, 3);
  out[base + 1] = __shfl_up_sync(0xffffffffu, lane * 10, 2);
  out[base + 2] = __shfl_down_sync(0xffffffffu, lane * 10, 2, 8);
  out[base + 3] = static_cast<int>(__ballot_sync(0xffffffffu, lane % 3 == 0));
}

__global__ void votes_kernel(int* out) {
  const int any = __syncthreads_or(threadIdx.x == 77);
  const int none = __syncthreads_or(0);
  const int count = __syncthreads_count(threadIdx.x % 4 == 0);
  const int all = __syncthreads_and(threadIdx.x < 1000);
  const int not_all = __syncthreads_and(threadIdx.x != 5);
  if (threadIdx.x == 0) {
    out[0] = any;
    out[1] = none;
    out[2] = count;
    out[3] = all;
    out[4] = not_all;
  }
}

// The last block to arrive folds every block's result (the pattern of norm.cu's fold).
__global__ void last_block_kernel(const double* in, int per_block, double* block_totals, int* arrival, double* total,
                                  bool fence) {
  __shared__ double partial[kThreads];
  __shared__ bool last;
  double sum = 0.0;
  for (int i = threadIdx.x; i < per_block; i += blockDim.x) sum += in[blockIdx.x * per_block + i];
  partial[threadIdx.x] = sum;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < static_cast<unsigned>(stride)) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    block_totals[blockIdx.x] = partial[0];
    if (fence) __threadfence();
    last = atomicAdd(arrival, 1) == static_cast<int>(gridDim.x) - 1;
  }
  __syncthreads();
  if (!last) return;
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (unsigned b = 0; b < gridDim.x; ++b) t += __ldcg(&block_totals[b]);
    *total = t;
    *arrival = 0;
  }
}

__global__ void cub_kernel(const double* in, double* block_out, double* warp_out) {
  using BlockFold = cub::BlockReduce<double, kThreads, cub::BLOCK_REDUCE_WARP_REDUCTIONS>;
  using WarpFold = cub::WarpReduce<double>;
  __shared__ typename BlockFold::TempStorage block_storage;
  __shared__ typename WarpFold::TempStorage warp_storage[kThreads / 32];
  const double v = in[blockIdx.x * blockDim.x + threadIdx.x];
  const double block_sum = BlockFold(block_storage).Sum(v);
  const double warp_max = WarpFold(warp_storage[threadIdx.x / 32]).Reduce(v, cub::Max{});
  if (threadIdx.x == 0) block_out[blockIdx.x] = block_sum;
  if (threadIdx.x % 32 == 0) warp_out[blockIdx.x * (kThreads / 32) + threadIdx.x / 32] = warp_max;
}

// Each block writes its index to shared memory and reads it back after a barrier: per-block storage.
__global__ void shared_per_block_kernel(int* mismatches) {
  __shared__ int mine;
  __shared__ int scratch[kThreads];
  if (threadIdx.x == 0) mine = static_cast<int>(blockIdx.x);
  scratch[threadIdx.x] = static_cast<int>(blockIdx.x);
  __syncthreads();
  for (int round = 0; round < 4; ++round) {
    if (mine != static_cast<int>(blockIdx.x) || scratch[(threadIdx.x + 1) % blockDim.x] != static_cast<int>(blockIdx.x))
      atomicAdd(mismatches, 1);
    __syncthreads();
  }
}

// Lane 0 waits at the block barrier for lanes that wait at a shuffle for lane 0.
__global__ void deadlock_kernel(int* out) {
  float v = 1.0f;
  if (threadIdx.x == 0) {
    __syncthreads();
  } else {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
  }
  out[threadIdx.x] = static_cast<int>(v);
}

__global__ void divergent_barrier_kernel(int* out) {
  if (threadIdx.x % 2 == 0) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void exited_lane_kernel(float* out) {
  if (threadIdx.x == 3) return;
  float v = 1.0f;
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}

__global__ void many_barriers_kernel(int* out, int rounds) {
  __shared__ int value[512];
  for (int r = 0; r < rounds; ++r) {
    value[threadIdx.x] = r + threadIdx.x;
    __syncthreads();
    const int other = value[(threadIdx.x + 1) % blockDim.x];
    __syncthreads();
    if (other != r + static_cast<int>((threadIdx.x + 1) % blockDim.x)) atomicAdd(out, 1);
  }
}

// ---------------------------------------------------------------------------------- tests
bool launch_failed(const char* what_in_message) {
  const cudaError_t error = cudaGetLastError();
  const std::string message = fastopt_emu::last_error_message();
  if (error != cudaErrorLaunchFailure) return false;
  return message.find(what_in_message) != std::string::npos;
}

void test_block_sum() {
  const int n = 100000, blocks = 7;
  std::vector<double> in(n), out(blocks);
  double expected = 0.0;
  for (int i = 0; i < n; ++i) expected += (in[i] = (i % 17) * 0.25);
  FASTOPT_LAUNCH(blocks, kThreads, 0, nullptr, block_sum_kernel)(in.data(), out.data(), n);
  EXPECT(cudaGetLastError() == cudaSuccess, "launch failed: %s", fastopt_emu::last_error_message().c_str());
  double total = 0.0;
  for (double v : out) total += v;
  EXPECT(total == expected, "%f != %f", total, expected);
}

void test_warp_xor() {
  std::vector<float> in(2 * 64), out(2 * 64);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<float>(i);
  FASTOPT_LAUNCH(2, 64, 0, nullptr, warp_xor_kernel)(in.data(), out.data());
  EXPECT(cudaGetLastError() == cudaSuccess, "launch failed");
  for (size_t i = 0; i < in.size(); ++i) {
    const size_t first = i / 32 * 32;
    const float expected = static_cast<float>(32 * first + 31 * 32 / 2);
    EXPECT(out[i] == expected, "lane %zu: %f != %f", i, out[i], expected);
  }
}

void test_shuffle_kinds() {
  std::vector<int> out(64 * 4);
  FASTOPT_LAUNCH(1, 64, 0, nullptr, shuffle_kinds_kernel)(out.data());
  EXPECT(cudaGetLastError() == cudaSuccess, "launch failed");
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (l % 3 == 0) ballot |= 1u << l;
  for (int t = 0; t < 64; ++t) {
    const int lane = t % 32;
    EXPECT(out[t * 4 + 0] == 30, "shfl t=%d %d", t, out[t * 4 + 0]);
    EXPECT(out[t * 4 + 1] == (lane >= 2 ? (lane - 2) * 10 : lane * 10), "shfl_up t=%d %d", t, out[t * 4 + 1]);
    EXPECT(out[t * 4 + 2] == (lane % 8 + 2 < 8 ? (lane + 2) * 10 : lane * 10), "shfl_down t=%d %d", t, out[t * 4 + 2]);
    EXPECT(static_cast<unsigned>(out[t * 4 + 3]) == ballot, "ballot t=%d %x", t, out[t * 4 + 3]);
  }
}

void test_votes() {
  int out[5] = {-1, -1, -1, -1, -1};
  FASTOPT_LAUNCH(1, 512, 0, nullptr, votes_kernel)(out);
  EXPECT(cudaGetLastError() == cudaSuccess, "launch failed");
  EXPECT(out[0] == 1 && out[1] == 0 && out[2] == 128 && out[3] == 1 && out[4] == 0, "%d %d %d %d %d", out[0], out[1],
         out[2], out[3], out[4]);
}

void test_last_block(bool fence, int blocks) {
  const int per_block = 1000;
  std::vector<double> in(static_cast<size_t>(blocks) * per_block), block_totals(static_cast<size_t>(blocks));
  double expected = 0.0;
  for (size_t i = 0; i < in.size(); ++i) expected += (in[i] = static_cast<double>(i % 11));
  int arrival = 0;
  double total = -1.0;
  for (int repeat = 0; repeat < 3; ++repeat) {
    total = -1.0;
    FASTOPT_LAUNCH(blocks, kThreads, 0, nullptr, last_block_kernel)(in.data(), per_block, block_totals.data(), &arrival,
                                                                     &total, fence);
    EXPECT(cudaGetLastError() == cudaSuccess, "launch failed");
    EXPECT(total == expected && arrival == 0, "%f != %f (arrival %d)", total, expected, arrival);
  }
}

void test_cub() {
  const int blocks = 3;
  std::vector<double> in(blocks * kThreads), block_out(blocks), warp_out(blocks * kThreads / 32);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<double>((i * 7919) % 1000) / 8.0;
  FASTOPT_LAUNCH(blocks, kThreads, 0, nullptr, cub_kernel)(in.data(), block_out.data(), warp_out.data());
  EXPECT(cudaGetLastError() == cudaSuccess, "launch failed");
  for (int b = 0; b < blocks; ++b) {
    double sum = 0.0;
    for (int t = 0; t < kThreads; ++t) sum += in[b * kThreads + t];
    EXPECT(block_out[b] == sum, "block %d: %f != %f", b, block_out[b], sum);
    for (int w = 0; w < kThreads / 32; ++w) {
      double m = in[b * kThreads + w * 32];
      for (int l = 1; l < 32; ++l) m = std::max(m, in[b * kThreads + w * 32 + l]);
      EXPECT(warp_out[b * kThreads / 32 + w] == m, "warp %d/%d", b, w);
    }
  }
}

void test_shared_per_block() {
  int mismatches = 0;
  FASTOPT_LAUNCH(16, kThreads, 0, nullptr, shared_per_block_kernel)(&mismatches);
  EXPECT(cudaGetLastError() == cudaSuccess, "launch failed");
  EXPECT(mismatches == 0, "%d threads saw another block's shared memory", mismatches);
}

void test_failures() {
  std::vector<int> out(256);
  FASTOPT_LAUNCH(1, 32, 0, nullptr, deadlock_kernel)(out.data());
  EXPECT(launch_failed("deadlock"), "a deadlock is a launch failure: %s",
         fastopt_emu::last_error_message().c_str());
  FASTOPT_LAUNCH(1, 64, 0, nullptr, divergent_barrier_kernel)(out.data());
  EXPECT(launch_failed("different barriers"), "divergent barriers fail the launch: %s",
         fastopt_emu::last_error_message().c_str());
  std::vector<float> f(64);
  FASTOPT_LAUNCH(1, 64, 0, nullptr, exited_lane_kernel)(f.data());
  EXPECT(launch_failed("exited"), "a shuffle naming an exited lane fails the launch: %s",
         fastopt_emu::last_error_message().c_str());
  FASTOPT_LAUNCH(1, 2048, 0, nullptr, exited_lane_kernel)(f.data());
  EXPECT(cudaGetLastError() == cudaErrorInvalidConfiguration, "2048 threads per block are refused");
  // The device works again afterwards.
  test_block_sum();
}

void test_speed() {
  int bad = 0;
  const auto start = std::chrono::steady_clock::now();
  const int rounds = 200;
  FASTOPT_LAUNCH(8, 512, 0, nullptr, many_barriers_kernel)(&bad, rounds);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT(cudaGetLastError() == cudaSuccess && bad == 0, "barrier rounds: %d bad", bad);
  std::printf("  %d barriers x 512 threads x 8 blocks: %.1f ms (%.0f ns per thread and barrier)\n", 2 * rounds,
              seconds * 1e3, seconds * 1e9 / (2.0 * rounds * 512 * 8));
}

// Planted races, for the TSan build (run_checks.sh expects a report from each).
void race_shared() {
  const int n = 4096;
  std::vector<double> in(n, 1.0), out(2);
  FASTOPT_LAUNCH(2, kThreads, 0, nullptr, block_sum_racy_kernel)(in.data(), out.data(), n);
}
void race_missing_fence() { test_last_block(false, 8); }

}  // namespace

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  struct Case {
    const char* name;
    void (*run)();
  } cases[] = {
      {"block_sum", test_block_sum},
      {"warp_xor", test_warp_xor},
      {"shuffle_kinds", test_shuffle_kinds},
      {"votes", test_votes},
      {"last_block", [] { test_last_block(true, 8); }},
      {"last_block_one", [] { test_last_block(true, 1); }},
      {"cub", test_cub},
      {"shared_per_block", test_shared_per_block},
      {"failures", test_failures},
      {"speed", test_speed},
      {"race-shared", race_shared},
      {"race-missing-fence", race_missing_fence},
  };
  int ran = 0;
  for (const Case& c : cases) {
    const bool planted = std::strncmp(c.name, "race-", 5) == 0;
    if (only.empty() ? planted : only != c.name) continue;
    std::printf("%s\n", c.name);
    c.run();
    ++ran;
  }
  if (ran == 0) {
    std::fprintf(stderr, "no test named %s\n", only.c_str());
    return 2;
  }
  std::printf(failures == 0 ? "ok\n" : "%d FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
