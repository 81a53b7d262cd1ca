// The CUDA kernels (csrc/cuda/*.cu through kernels.h, unchanged) on the emulated device, driven without
// torch, for the ThreadSanitizer and AddressSanitizer builds (run_checks.sh): every tensor is its
// own heap allocation that ends exactly where the tensor ends (so one element read or written past
// it is a heap-buffer-overflow), tables are built as host_runtime.cpp builds them (chunk_plan.h), and every
// launcher runs over a few chunks with grids of several blocks (so that the last-block fold and
// the arrival counters race for real if their fences or barriers are missing). Results are
// checked against double-precision host loops.
//
// Usage: kernel_driver [case...]   (no case: all of them). Exit status 0 when every check held.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/chunk_plan.h"
#include "cuda/kernels.h"
#include "runtime.h"

namespace {

using namespace fastopt;

int failures = 0;
#define EXPECT(cond, ...)                                                        \
  do {                                                                           \
    if (!(cond)) {                                                               \
      ++failures;                                                                \
      std::fprintf(stderr, "%s:%d: FAILED: %s: ", __FILE__, __LINE__, #cond);   \
      std::fprintf(stderr, __VA_ARGS__);                                         \
      std::fprintf(stderr, "\n");                                                \
    }                                                                            \
  } while (0)

size_t element_size(DType d) { return d == kFloat64 ? 8 : d == kFloat32 ? 4 : 2; }

// A tensor in its own allocation: `shift` elements of padding before it (a misaligned start), none after.
struct Tensor {
  DType dtype;
  int64_t numel;
  int64_t rows;  // AGC units (dim 0), 1 for a whole tensor
  char* base = nullptr;
  void* data = nullptr;

  Tensor(DType d, int64_t n, int shift, int64_t r = 1) : dtype(d), numel(n), rows(r) {
    base = static_cast<char*>(std::malloc((static_cast<size_t>(n) + shift) * element_size(d) + (n + shift == 0)));
    data = base + shift * element_size(d);
  }
  Tensor(const Tensor&) = delete;
  Tensor(Tensor&& o) noexcept : dtype(o.dtype), numel(o.numel), rows(o.rows), base(o.base), data(o.data) {
    o.base = nullptr;
  }
  ~Tensor() { std::free(base); }

  double get(int64_t i) const {
    switch (dtype) {
      case kFloat16: return __half2float(static_cast<const __half*>(data)[i]);
      case kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(data)[i]);
      case kFloat32: return static_cast<const float*>(data)[i];
      default: return static_cast<const double*>(data)[i];
    }
  }
  void set(int64_t i, double v) {
    switch (dtype) {
      case kFloat16: static_cast<__half*>(data)[i] = __float2half_rn(static_cast<float>(v)); break;
      case kBFloat16: static_cast<__nv_bfloat16*>(data)[i] = __float2bfloat16_rn(static_cast<float>(v)); break;
      case kFloat32: static_cast<float*>(data)[i] = static_cast<float>(v); break;
      default: static_cast<double*>(data)[i] = v;
    }
  }
};

std::mt19937 rng(2024);

std::vector<Tensor> make_list(const std::vector<int64_t>& sizes, const std::vector<DType>& dtypes, double scale = 1.0,
                              bool positive = false, int shift_seed = 0) {
  static const int shifts[] = {0, 1, 0, 3, 8, 5, 2};
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<Tensor> list;
  for (size_t i = 0; i < sizes.size(); ++i) {
    list.emplace_back(dtypes[i % dtypes.size()], sizes[i], shifts[(i + shift_seed) % 7]);
    for (int64_t k = 0; k < sizes[i]; ++k) {
      const double v = normal(rng);
      list.back().set(k, positive ? std::fabs(v) : v);
    }
  }
  return list;
}

// The device table of host_runtime.cpp, in host memory (the emulated device's memory).
struct Table {
  std::vector<int64_t> buffer;
  DeviceTable view{};
  ChunkPlan plan;

  Table(const std::vector<const std::vector<Tensor>*>& lists, bool units, bool adamw_groups, bool min_one_chunk) {
    const auto& first = *lists.front();
    const int64_t n = static_cast<int64_t>(first.size()), num_lists = static_cast<int64_t>(lists.size());
    std::vector<int64_t> numels(n), unit_counts, keys;
    for (int64_t i = 0; i < n; ++i) numels[i] = first[i].numel;
    if (units)
      for (const Tensor& t : first) unit_counts.push_back(t.rows);
    if (adamw_groups)
      for (int64_t i = 0; i < n; ++i)
        keys.push_back((*lists[0])[i].dtype * 16 + (*lists[1])[i].dtype * 4 + (*lists[num_lists > 2 ? 2 : 0])[i].dtype);
    plan = plan_chunks(numels, unit_counts, keys, kChunkSize, min_one_chunk);
    for (const auto* list : lists)
      for (const Tensor& t : *list) buffer.push_back(reinterpret_cast<int64_t>(t.data));
    for (const auto* list : lists)
      for (const Tensor& t : *list) buffer.push_back(t.dtype);
    buffer.insert(buffer.end(), numels.begin(), numels.end());
    std::vector<int64_t> large;
    for (int64_t s = 0; s < plan.num_segments(); ++s)
      if (plan.segment_num_chunks[s] > kWarpFoldChunks) large.push_back(s);
    for (const std::vector<int64_t>* column : std::initializer_list<const std::vector<int64_t>*>{&plan.chunk_tensor, &plan.chunk_segment, &plan.chunk_start, &plan.chunk_end,
                               &plan.segment_tensor, &plan.segment_first_chunk, &plan.segment_num_chunks,
                               static_cast<const std::vector<int64_t>*>(&large)})
      buffer.insert(buffer.end(), column->begin(), column->end());
    const int64_t c = plan.num_chunks(), s = plan.num_segments();
    const int64_t* b = buffer.data();
    view.addresses = b;
    view.dtypes = b + num_lists * n;
    view.numels = b + 2 * num_lists * n;
    view.chunk_tensor = view.numels + n;
    view.chunk_segment = view.chunk_tensor + c;
    view.chunk_start = view.chunk_segment + c;
    view.chunk_end = view.chunk_start + c;
    view.segment_tensor = view.chunk_end + c;
    view.segment_first_chunk = view.segment_tensor + s;
    view.segment_num_chunks = view.segment_first_chunk + s;
    view.large_segments = view.segment_num_chunks + s;
    view.num_lists = num_lists;
    view.num_tensors = n;
    view.num_chunks = c;
    view.num_segments = s;
    view.num_large_segments = static_cast<int64_t>(large.size());
  }
  LaunchRange all() const { return {0, view.num_chunks, fastopt_emu::multiprocessor_count()}; }
};

bool launch_ok(const char* what) {
  const cudaError_t error = cudaGetLastError();
  EXPECT(error == cudaSuccess, "%s: launch failed: %s", what, fastopt_emu::last_error_message().c_str());
  return error == cudaSuccess;
}

bool close(double actual, double expected, double rtol, double atol = 1e-30) {
  if (std::isnan(expected)) return std::isnan(actual);
  if (std::isinf(expected)) return actual == expected;
  return std::fabs(actual - expected) <= atol + rtol * std::fabs(expected);
}

double reference_norm(const std::vector<double>& values, double p) {
  double acc = 0.0;
  for (double v : values) {
    const double a = std::fabs(v);
    if (std::isinf(p)) {
      acc = (std::isnan(a) || a > acc) ? a : acc;
    } else {
      acc += std::pow(a, p);
    }
  }
  return std::isinf(p) || p == 1.0 ? acc : std::pow(acc, 1.0 / p);
}

const std::vector<int64_t> kSizes = {0, 1, 7, 33, 4099, 32768 + 5, 70001, 129, 2 * 32768};
const std::vector<DType> kAllDtypes = {kFloat32, kBFloat16, kFloat16, kFloat64};
bool quick = false;  // --quick (the TSan run): fewer norm kinds and update builds, same layouts

// --------------------------------------------------------------------------------------- cases
void case_norm() {
  // Many small tensors too: more than one block of the fold (per-tensor norms need a warp each).
  std::vector<int64_t> sizes = kSizes;
  for (int i = 0; i < 150; ++i) sizes.push_back(1 + i % 5);
  for (double p : {2.0, static_cast<double>(INFINITY), 1.0, 3.0}) {
    if (quick && p != 2.0 && !std::isinf(p)) continue;
    auto list = make_list(sizes, kAllDtypes);
    Table table({&list}, false, false, false);
    std::vector<double> scratch(static_cast<size_t>(table.view.num_chunks) + kMaxFinishBlocks);
    std::vector<float> norms(sizes.size());
    float total = -1.0f, found_inf = 0.0f;
    int arrival = 12345;  // poisoned: the launcher zeroes it
    const NormKind kind = norm_kind(p);
    launch_norm_partials(table.view, table.all(), 0, kind, p, scratch.data(), &found_inf, false, {1.0, nullptr, kFloat32},
                         nullptr);
    if (!launch_ok("norm partials")) return;
    launch_norm_finish(table.view, scratch.data(), kind, p, norms.data(), &total, scratch.data() + table.view.num_chunks,
                       &arrival, fastopt_emu::multiprocessor_count(), nullptr);
    if (!launch_ok("norm finish")) return;
    std::vector<double> all;
    for (size_t i = 0; i < list.size(); ++i) {
      std::vector<double> v;
      for (int64_t k = 0; k < list[i].numel; ++k) v.push_back(list[i].get(k));
      EXPECT(close(norms[i], reference_norm(v, p), 1e-5), "p=%g tensor %zu: %g vs %g", p, i, norms[i],
             reference_norm(v, p));
      all.insert(all.end(), v.begin(), v.end());
    }
    EXPECT(close(total, reference_norm(all, p), 1e-5), "p=%g total %g vs %g", p, total, reference_norm(all, p));
    EXPECT(found_inf == 0.0f, "found_inf set without an inf");
  }
}

void case_unscale() {
  auto list = make_list(kSizes, kAllDtypes);
  std::vector<std::vector<double>> before;
  for (const Tensor& t : list) {
    std::vector<double> v;
    for (int64_t k = 0; k < t.numel; ++k) v.push_back(t.get(k));
    before.push_back(v);
  }
  list[6].set(40000, INFINITY);
  before[6][40000] = INFINITY;
  Table table({&list}, false, false, false);
  float found_inf = 0.0f;
  const float inv_scale = 0.25f;
  launch_norm_partials(table.view, table.all(), 0, kNoNorm, 2.0, nullptr, &found_inf, true, {0.0, &inv_scale, kFloat32},
                       nullptr);
  if (!launch_ok("unscale")) return;
  EXPECT(found_inf == 1.0f, "found_inf %g", found_inf);
  for (size_t i = 0; i < list.size(); ++i)
    for (int64_t k = 0; k < list[i].numel; ++k)
      // (fp16 values below 2^-12 become subnormal: absolute error up to 2^-25)
      EXPECT(close(list[i].get(k), before[i][k] * 0.25, 1e-2, 1e-6), "unscale tensor %zu[%lld]", i,
             static_cast<long long>(k));
}

void case_scale_clamp() {
  auto list = make_list(kSizes, kAllDtypes, 2.0);
  std::vector<std::vector<double>> before;
  for (const Tensor& t : list) {
    std::vector<double> v;
    for (int64_t k = 0; k < t.numel; ++k) v.push_back(t.get(k));
    before.push_back(v);
  }
  Table table({&list}, false, false, false);
  launch_clamp(table.view, table.all(), 1.5, nullptr);
  if (!launch_ok("clamp")) return;
  const double factor = 0.5;
  launch_scale(table.view, table.all(), 0, {0.0, &factor, kFloat64}, nullptr, nullptr);
  if (!launch_ok("scale")) return;
  for (size_t i = 0; i < list.size(); ++i)
    for (int64_t k = 0; k < list[i].numel; ++k) {
      const double want = std::fmax(-1.5, std::fmin(1.5, before[i][k])) * 0.5;
      EXPECT(close(list[i].get(k), want, 1e-2, 1e-6), "clamp+scale tensor %zu[%lld]", i, static_cast<long long>(k));
    }
}

void case_agc() {
  // (rows, numel): units of dim 0; one unit of more than two chunks.
  const std::vector<std::pair<int64_t, int64_t>> shapes = {{1, 7}, {3, 3 * 33}, {2, 2 * 70001}, {5, 5 * 4099}, {1, 0}};
  std::vector<Tensor> params, grads;
  std::normal_distribution<double> normal(0.0, 1.0);
  int index = 0;
  for (auto [rows, numel] : shapes) {
    const DType d = kAllDtypes[index % 4];
    params.emplace_back(d, numel, index % 3, rows);
    grads.emplace_back(d, numel, (index + 1) % 4, rows);
    for (int64_t k = 0; k < numel; ++k) {
      params.back().set(k, normal(rng) * 0.01);
      grads.back().set(k, normal(rng));
    }
    ++index;
  }
  std::vector<std::vector<double>> before;
  for (const Tensor& g : grads) {
    std::vector<double> v;
    for (int64_t k = 0; k < g.numel; ++k) v.push_back(g.get(k));
    before.push_back(v);
  }
  Table table({&params, &grads}, true, false, false);
  std::vector<double> partials(2 * static_cast<size_t>(table.view.num_chunks)), coefficients(table.view.num_segments);
  const double clip = 0.01, eps = 1e-3;
  launch_pair_norm_partials(table.view, table.all(), kSumSquares, 2.0, partials.data(), nullptr);
  if (!launch_ok("agc partials")) return;
  launch_agc_coefficients(table.view, partials.data(), kSumSquares, 2.0, clip, eps, coefficients.data(), nullptr);
  if (!launch_ok("agc coefficients")) return;
  launch_scale(table.view, table.all(), 1, {1.0, nullptr, kFloat32}, coefficients.data(), nullptr);
  if (!launch_ok("agc scale")) return;
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t rows = grads[i].rows, per = rows ? grads[i].numel / rows : 0;
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<double> w, g;
      for (int64_t k = r * per; k < (r + 1) * per; ++k) {
        w.push_back(params[i].get(k));
        g.push_back(before[i][k]);
      }
      const double wn = reference_norm(w, 2.0), gn = reference_norm(g, 2.0);
      const double limit = clip * std::fmax(wn, eps);
      const double coef = gn > limit ? limit / std::fmax(gn, 1e-6) : 1.0;
      for (int64_t k = r * per; k < (r + 1) * per; ++k)
        if (!close(grads[i].get(k), before[i][k] * coef, 1e-2, 1e-6)) {
          EXPECT(false, "agc tensor %zu unit %lld [%lld]: %g, want %g (coefficient %g)", i, static_cast<long long>(r),
                 static_cast<long long>(k), grads[i].get(k), before[i][k] * coef, coef);
          break;
        }
    }
  }
}

std::vector<std::vector<double>> snapshot(const std::vector<Tensor>& list) {
  std::vector<std::vector<double>> out;
  for (const Tensor& t : list) {
    std::vector<double> x;
    for (int64_t k = 0; k < t.numel; ++k) x.push_back(t.get(k));
    out.push_back(x);
  }
  return out;
}

void case_adamw(bool skip, bool l2 = false) {
  const std::vector<int64_t> sizes = {0, 7, 70001, 4099, 32768 + 3, 1};
  struct Combo {
    DType p, g, s;
  };
  for (Combo combo : {Combo{kFloat32, kFloat32, kFloat32}, Combo{kBFloat16, kBFloat16, kFloat32},
                      Combo{kFloat16, kFloat32, kFloat16}, Combo{kFloat64, kFloat64, kFloat64}}) {
    if (quick && combo.p != kFloat32 && combo.p != kBFloat16) continue;
    auto params = make_list(sizes, {combo.p});
    auto grads = make_list(sizes, {combo.g}, 1.0, false, 1);
    auto m = make_list(sizes, {combo.s}, 0.1, false, 2);
    auto v = make_list(sizes, {combo.s}, 0.01, true, 3);
    std::vector<Tensor> steps;
    for (size_t i = 0; i < sizes.size(); ++i) {
      steps.emplace_back(kFloat32, 1, 0);
      steps.back().set(0, static_cast<double>(i % 3));
    }
    const auto p0 = snapshot(params), g0 = snapshot(grads), m0 = snapshot(m), v0 = snapshot(v), s0 = snapshot(steps);
    Table table({&params, &grads, &m, &v, &steps}, false, true, true);
    // Zeroed before the launches, as host_runtime.cpp does (cudaMemsetAsync); poisoned before that.
    std::vector<int> arrivals(static_cast<size_t>(table.view.num_segments), 7);
    cudaMemsetAsync(arrivals.data(), 0, arrivals.size() * sizeof(int), nullptr);
    const float found_inf = skip ? 1.0f : 0.0f;
    AdamWArgs args{};
    args.lr = {1e-2, nullptr, kFloat32};
    args.grad_scale = {1.0, nullptr, kFloat32};
    args.clip_coef = {1.0, nullptr, kFloat32};
    args.found_inf = &found_inf;
    args.beta1 = 0.9;
    args.beta2 = 0.99;
    args.eps = 1e-8;
    args.weight_decay = 0.1;
    args.decoupled_weight_decay = !l2;
    args.arrivals = arrivals.data();
    for (const ChunkGroup& group : table.plan.groups) {
      launch_adamw(table.view, {group.first_chunk, group.num_chunks, fastopt_emu::multiprocessor_count()},
                   static_cast<DType>(group.key / 16), static_cast<DType>(group.key / 4 % 4),
                   static_cast<DType>(group.key % 4), args, nullptr);
      if (!launch_ok("adamw")) return;
    }
    const double tol = combo.p == kFloat32 || combo.p == kFloat64 ? 1e-5 : 1e-2;
    for (size_t i = 0; i < sizes.size(); ++i) {
      const double step = s0[i][0] + (skip ? 0 : 1);
      EXPECT(steps[i].get(0) == step, "adamw step count of tensor %zu: %g, want %g", i, steps[i].get(0), step);
      for (int64_t k = 0; k < sizes[i]; ++k) {
        double p = p0[i][k], g = g0[i][k], mm = m0[i][k], vv = v0[i][k];
        if (!skip) {
          if (l2) {
            g += 0.1 * p;
          } else {
            p *= 1 - 1e-2 * 0.1;
          }
          mm = mm + (g - mm) * 0.1;
          vv = vv * 0.99 + 0.01 * g * g;
          const double bc1 = 1 - std::pow(0.9, step), bc2 = 1 - std::pow(0.99, step);
          p -= 1e-2 / bc1 * mm / (std::sqrt(vv) / std::sqrt(bc2) + 1e-8);
        }
        if (!close(params[i].get(k), p, tol, 1e-6) || !close(m[i].get(k), mm, tol, 1e-6) ||
            !close(v[i].get(k), vv, tol, 1e-9)) {
          EXPECT(false, "adamw (%d,%d,%d)%s%s tensor %zu[%lld]: p %g want %g", static_cast<int>(combo.p), static_cast<int>(combo.g), static_cast<int>(combo.s),
                 l2 ? " l2" : "", skip ? " skipped" : "", i, static_cast<long long>(k), params[i].get(k), p);
          break;
        }
      }
    }
  }
}

// SGD (every momentum mode, Nesterov, weight decay) and Lion over the same layouts, a device lr and
// grad_scale among the host scalars; with `skip`, found_inf is set and no bit may change.
struct UpdateCombo {
  DType p, g, s;
};
const UpdateCombo kUpdateCombos[] = {{kFloat32, kFloat32, kFloat32}, {kBFloat16, kBFloat16, kFloat32},
                                     {kFloat16, kFloat32, kFloat16}, {kFloat64, kFloat64, kFloat64}};
const std::vector<int64_t> kUpdateSizes = {0, 7, 70001, 4099, 32768 + 3, 1};

// Launches one update per dtype group of a table of (params, grads[, states]).
template <typename Launch>
bool launch_groups(const Table& table, const char* what, Launch&& launch) {
  for (const ChunkGroup& group : table.plan.groups) {
    launch(LaunchRange{group.first_chunk, group.num_chunks, fastopt_emu::multiprocessor_count()},
           static_cast<DType>(group.key / 16), static_cast<DType>(group.key / 4 % 4), static_cast<DType>(group.key % 4));
    if (!launch_ok(what)) return false;
  }
  return true;
}

void case_sgd(bool skip) {
  enum Mode { kNone, kFirst, kRunning };
  for (UpdateCombo combo : kUpdateCombos) {
    if (quick && combo.p != kFloat32 && combo.p != kBFloat16) continue;
    for (Mode mode : {kNone, kFirst, kRunning}) {
      const bool nesterov = mode == kRunning, with_buffers = mode != kNone;
      auto params = make_list(kUpdateSizes, {combo.p});
      auto grads = make_list(kUpdateSizes, {combo.g}, 1.0, false, 1);
      // Without buffers the key's state is the param's dtype (as host_runtime.cpp groups it).
      auto buffers = make_list(with_buffers ? kUpdateSizes : std::vector<int64_t>{}, {combo.s}, 0.1, false, 2);
      const auto p0 = snapshot(params), g0 = snapshot(grads), b0 = snapshot(buffers);
      std::vector<const std::vector<Tensor>*> lists = {&params, &grads};
      if (with_buffers) lists.push_back(&buffers);
      Table table(lists, false, true, false);
      const float found_inf = skip ? 1.0f : 0.0f;
      const float lr = 1e-2f, grad_scale = 4.0f;
      SGDArgs args{};
      args.lr = {0.0, &lr, kFloat32};
      args.grad_scale = {0.0, &grad_scale, kFloat32};
      args.clip_coef = {0.5, nullptr, kFloat32};
      args.found_inf = &found_inf;
      args.momentum = 0.9;
      args.dampening = 0.1;
      args.weight_decay = 0.01;
      args.nesterov = nesterov;
      args.momentum_buffers = with_buffers;
      args.first_step = mode == kFirst;
      if (!launch_groups(table, "sgd", [&](LaunchRange range, DType p, DType g, DType s) {
            launch_sgd(table.view, range, p, g, s, args, nullptr);
          }))
        return;
      const double tol = combo.p == kFloat32 || combo.p == kFloat64 ? 1e-5 : 1e-2;
      for (size_t i = 0; i < kUpdateSizes.size(); ++i) {
        for (int64_t k = 0; k < kUpdateSizes[i]; ++k) {
          double p = p0[i][k], g = g0[i][k] / 4.0 * 0.5, b = with_buffers ? b0[i][k] : 0.0;
          if (!skip) {
            g += 0.01 * p;
            if (with_buffers) {
              b = mode == kFirst ? g : b * 0.9 + 0.9 * g;
              g = nesterov ? g + 0.9 * b : b;
            }
            p -= 1e-2 * g;
          }
          if (!close(params[i].get(k), p, tol, 1e-6) || (with_buffers && !close(buffers[i].get(k), b, tol, 1e-6))) {
            EXPECT(false, "sgd (%d,%d,%d) mode %d%s tensor %zu[%lld]: p %g want %g", static_cast<int>(combo.p),
                   static_cast<int>(combo.g), static_cast<int>(combo.s), static_cast<int>(mode), skip ? " skipped" : "",
                   i, static_cast<long long>(k), params[i].get(k), p);
            break;
          }
        }
      }
    }
  }
}

void case_lion(bool skip) {
  for (UpdateCombo combo : kUpdateCombos) {
    if (quick && combo.p != kFloat32 && combo.p != kBFloat16) continue;
    auto params = make_list(kUpdateSizes, {combo.p});
    auto grads = make_list(kUpdateSizes, {combo.g}, 1.0, false, 1);
    auto m = make_list(kUpdateSizes, {combo.s}, 0.1, false, 2);
    const auto p0 = snapshot(params), g0 = snapshot(grads), m0 = snapshot(m);
    Table table({&params, &grads, &m}, false, true, false);
    const float found_inf = skip ? 1.0f : 0.0f;
    const double lr = 1e-3;
    LionArgs args{};
    args.lr = {0.0, &lr, kFloat64};
    args.grad_scale = {2.0, nullptr, kFloat32};
    args.clip_coef = {1.0, nullptr, kFloat32};
    args.found_inf = &found_inf;
    args.beta1 = 0.9;
    args.beta2 = 0.99;
    args.weight_decay = 0.1;
    args.maximize = true;
    if (!launch_groups(table, "lion", [&](LaunchRange range, DType p, DType g, DType s) {
          launch_lion(table.view, range, p, g, s, args, nullptr);
        }))
      return;
    const double tol = combo.p == kFloat32 || combo.p == kFloat64 ? 1e-5 : 1e-2;
    for (size_t i = 0; i < kUpdateSizes.size(); ++i) {
      for (int64_t k = 0; k < kUpdateSizes[i]; ++k) {
        double p = p0[i][k], g = -g0[i][k] / 2.0, mm = m0[i][k];
        if (!skip) {
          const double direction = mm + 0.1 * (g - mm);
          p = p * (1 - lr * 0.1) - lr * (direction > 0 ? 1.0 : direction < 0 ? -1.0 : 0.0);
          mm = mm + 0.01 * (g - mm);
        }
        if (!close(params[i].get(k), p, tol, 1e-6) || !close(m[i].get(k), mm, tol, 1e-6)) {
          EXPECT(false, "lion (%d,%d,%d)%s tensor %zu[%lld]: p %g want %g, m %g want %g", static_cast<int>(combo.p),
                 static_cast<int>(combo.g), static_cast<int>(combo.s), skip ? " skipped" : "", i,
                 static_cast<long long>(k), params[i].get(k), p, m[i].get(k), mm);
          break;
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  struct Case {
    const char* name;
    void (*run)();
  } cases[] = {
      {"norm", case_norm},
      {"unscale", case_unscale},
      {"scale_clamp", case_scale_clamp},
      {"agc", case_agc},
      {"adamw", [] { case_adamw(false); }},
      {"adamw_skip", [] { case_adamw(true); }},
      {"adam_l2", [] { case_adamw(false, true); }},
      {"sgd", [] { case_sgd(false); }},
      {"sgd_skip", [] { case_sgd(true); }},
      {"lion", [] { case_lion(false); }},
      {"lion_skip", [] { case_lion(true); }},
  };
  int ran = 0, named = 0;
  for (int i = 1; i < argc; ++i) {
    if (std::strcmp(argv[i], "--quick") == 0) {
      quick = true;
    } else {
      ++named;
    }
  }
  for (const Case& c : cases) {
    bool wanted = named == 0;
    for (int i = 1; i < argc; ++i) wanted |= std::strcmp(argv[i], c.name) == 0;
    if (!wanted) continue;
    std::printf("%s\n", c.name);
    std::fflush(stdout);
    c.run();
    ++ran;
  }
  if (ran == 0) {
    std::fprintf(stderr, "no such case\n");
    return 2;
  }
  std::printf(failures == 0 ? "ok\n" : "%d FAILED\n", failures);
  return failures == 0 ? 0 : 1;
}
