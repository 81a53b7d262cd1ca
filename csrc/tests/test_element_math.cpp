// Host unit test of csrc/common/element_math.h: every per-element function the kernels call, checked on
// concrete values against known answers (literals derived by hand or in high precision, or the
// formula written out here in double), and on random data (fixed seeds, never all zeros).
#include "common/element_math.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"

namespace {

using fastopt::NormKind;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

template <typename A>
const char* type_name() {
  return sizeof(A) == sizeof(float) ? "float" : "double";
}

// The distance from |x| to the next larger value of its type.
template <typename A>
A ulp(A x) {
  const A magnitude = std::fabs(x);
  return std::nextafter(magnitude, std::numeric_limits<A>::infinity()) - magnitude;
}

// Random values of varied magnitude and sign (a normal times 10^uniform(-3, 2)); never zero.
template <typename A>
std::vector<A> random_values(std::mt19937& rng, size_t count) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> exponent(-3.0, 2.0);
  std::vector<A> values(count);
  for (A& value : values) {
    double x = 0.0;
    while (x == 0.0) x = normal(rng) * std::pow(10.0, exponent(rng));
    value = static_cast<A>(x);
  }
  return values;
}

// --------------------------------------------------------------------------------- norm_kind

void test_norm_kind() {
  CHECK(fastopt::norm_kind(1.0) == fastopt::kSumAbs, "p = 1");
  CHECK(fastopt::norm_kind(2.0) == fastopt::kSumSquares, "p = 2");
  CHECK(fastopt::norm_kind(kInf) == fastopt::kMaxAbs, "p = inf");
  CHECK(fastopt::norm_kind(3.0) == fastopt::kSumPowers, "p = 3");
  CHECK(fastopt::norm_kind(0.5) == fastopt::kSumPowers, "p = 0.5");
  CHECK(fastopt::norm_kind(1.5) == fastopt::kSumPowers, "p = 1.5");
  CHECK(fastopt::norm_kind(2.0000000000000004) == fastopt::kSumPowers, "p just above 2");
  CHECK(fastopt::norm_kind(0.9999999999999999) == fastopt::kSumPowers, "p just below 1");
}

void test_is_finite() {
  CHECK(fastopt::is_finite(1.5), "1.5");
  CHECK(fastopt::is_finite(-0.0), "-0");
  CHECK(fastopt::is_finite(std::numeric_limits<double>::max()), "max");
  CHECK(fastopt::is_finite(std::numeric_limits<double>::denorm_min()), "denormal");
  CHECK(fastopt::is_finite(static_cast<double>(std::numeric_limits<float>::max())), "float max");
  CHECK(!fastopt::is_finite(kInf), "inf");
  CHECK(!fastopt::is_finite(-kInf), "-inf");
  CHECK(!fastopt::is_finite(kNaN), "nan");
  CHECK(!fastopt::is_finite(static_cast<double>(std::numeric_limits<float>::infinity())), "float inf");
  // In float itself, as the kernels call it.
  CHECK(fastopt::is_finite(std::numeric_limits<float>::max()), "float max (float)");
  CHECK(fastopt::is_finite(std::numeric_limits<float>::denorm_min()), "float denormal (float)");
  CHECK(!fastopt::is_finite(std::numeric_limits<float>::infinity()), "float inf (float)");
  CHECK(!fastopt::is_finite(-std::numeric_limits<float>::infinity()), "float -inf (float)");
  CHECK(!fastopt::is_finite(std::numeric_limits<float>::quiet_NaN()), "float nan (float)");
}

// ------------------------------------------------------------------------ max_propagating_nan

template <typename A>
void test_max_propagating_nan() {
  const A nan = std::numeric_limits<A>::quiet_NaN(), inf = std::numeric_limits<A>::infinity();
  const std::string t = type_name<A>();
  CHECK(fastopt::max_propagating_nan(A(2), A(3)) == A(3), t);
  CHECK(fastopt::max_propagating_nan(A(3), A(2)) == A(3), t);
  CHECK(fastopt::max_propagating_nan(A(-7), A(-8)) == A(-7), t);
  CHECK(fastopt::max_propagating_nan(A(1), inf) == inf, t);
  CHECK(fastopt::max_propagating_nan(-inf, A(1)) == A(1), t);
  CHECK(std::isnan(fastopt::max_propagating_nan(nan, A(1))), t, ": nan on the left");
  CHECK(std::isnan(fastopt::max_propagating_nan(A(1), nan)), t, ": nan on the right");
  CHECK(std::isnan(fastopt::max_propagating_nan(nan, inf)), t, ": nan beats inf (left)");
  CHECK(std::isnan(fastopt::max_propagating_nan(inf, nan)), t, ": nan beats inf (right)");
  CHECK(std::isnan(fastopt::max_propagating_nan(nan, nan)), t, ": nan, nan");
  // std::fmax would drop the nan: the point of this function.
  CHECK(!std::isnan(std::fmax(A(1), nan)), t, ": fmax drops nan (sanity of the test)");
}

// ---------------------------------------------------------------- norm_contribution / combine / finish

// The norm through the header's three functions, folded sequentially or pairwise (as a tree, the
// way partials of chunks and warps are combined).
template <typename A>
A norm_through_header(const std::vector<A>& values, NormKind kind, A p, bool pairwise) {
  std::vector<A> partials;
  for (A x : values) partials.push_back(fastopt::norm_contribution(x, kind, p));
  if (!pairwise) {
    A accumulated = A(0);
    for (A partial : partials) accumulated = fastopt::norm_combine(accumulated, partial, kind);
    return fastopt::norm_finish(accumulated, kind, p);
  }
  if (partials.empty()) return fastopt::norm_finish(A(0), kind, p);
  while (partials.size() > 1) {
    std::vector<A> next;
    for (size_t i = 0; i < partials.size(); i += 2)
      next.push_back(i + 1 < partials.size() ? fastopt::norm_combine(partials[i], partials[i + 1], kind) : partials[i]);
    partials.swap(next);
  }
  return fastopt::norm_finish(partials[0], kind, p);
}

// The p-norm written out in double: (sum |x|^p)^(1/p), or max |x| for p = inf.
template <typename A>
double expected_norm(const std::vector<A>& values, double p) {
  if (std::isinf(p)) {
    double largest = 0.0;
    for (A x : values) largest = std::max(largest, std::fabs(static_cast<double>(x)));
    return largest;
  }
  double sum = 0.0;
  for (A x : values) sum += std::pow(std::fabs(static_cast<double>(x)), p);
  return std::pow(sum, 1.0 / p);
}

template <typename A>
void test_norm_literals() {
  const std::string t = type_name<A>();
  const std::vector<A> v = {A(3), A(-4)};
  // {3, -4}: |.|_1 = 7, |.|_2 = 5, |.|_inf = 4, |.|_3 = 91^(1/3), |.|_0.5 = (sqrt 3 + 2)^2 = 7 + 4 sqrt 3.
  const struct {
    double p;
    NormKind kind;
    double expected;
  } cases[] = {
      {1.0, fastopt::kSumAbs, 7.0},
      {2.0, fastopt::kSumSquares, 5.0},
      {kInf, fastopt::kMaxAbs, 4.0},
      {3.0, fastopt::kSumPowers, 4.497941445275415},
      {0.5, fastopt::kSumPowers, 13.928203230275509},
  };
  const double rtol = sizeof(A) == sizeof(float) ? 4e-7 : 4e-16;
  for (const auto& c : cases) {
    CHECK(fastopt::norm_kind(c.p) == c.kind, t, " p = ", c.p);
    for (bool pairwise : {false, true})
      CHECK_CLOSE(norm_through_header(v, c.kind, A(c.p), pairwise), c.expected, rtol * c.expected, t, " p = ", c.p);
  }

  // One element's contribution, per kind.
  CHECK(fastopt::norm_contribution(A(-2.5), fastopt::kSumAbs, A(1)) == A(2.5), t);
  CHECK(fastopt::norm_contribution(A(-2.5), fastopt::kMaxAbs, A(kInf)) == A(2.5), t);
  CHECK(fastopt::norm_contribution(A(-2.5), fastopt::kSumSquares, A(2)) == A(6.25), t);
  CHECK_CLOSE(fastopt::norm_contribution(A(-2.5), fastopt::kSumPowers, A(3)), 15.625, 15.625 * rtol, t, " |-2.5|^3");
  CHECK_CLOSE(fastopt::norm_contribution(A(-6.25), fastopt::kSumPowers, A(0.5)), 2.5, 2.5 * rtol, t, " |-6.25|^0.5");
  CHECK(fastopt::norm_contribution(A(0), fastopt::kSumPowers, A(0.5)) == A(0), t, " 0^0.5");
  CHECK(fastopt::norm_contribution(A(-2.5), fastopt::kNoNorm, A(2)) == A(0), t, " kNoNorm contributes nothing");

  // Combining: a sum for the sum kinds, a max for kMaxAbs.
  for (NormKind kind : {fastopt::kSumAbs, fastopt::kSumSquares, fastopt::kSumPowers})
    CHECK(fastopt::norm_combine(A(1.25), A(2.5), kind) == A(3.75), t, " kind ", kind);
  CHECK(fastopt::norm_combine(A(1.25), A(2.5), fastopt::kMaxAbs) == A(2.5), t);
  CHECK(fastopt::norm_combine(A(2.5), A(1.25), fastopt::kMaxAbs) == A(2.5), t);

  // Finishing: a square root for p = 2, the p-th root for other finite p, nothing else otherwise.
  CHECK(fastopt::norm_finish(A(6.25), fastopt::kSumSquares, A(2)) == A(2.5), t);
  CHECK_CLOSE(fastopt::norm_finish(A(15.625), fastopt::kSumPowers, A(3)), 2.5, 2.5 * rtol, t, " cube root");
  CHECK_CLOSE(fastopt::norm_finish(A(2.5), fastopt::kSumPowers, A(0.5)), 6.25, 6.25 * rtol, t, " 0.5 root");
  CHECK(fastopt::norm_finish(A(6.25), fastopt::kSumAbs, A(1)) == A(6.25), t);
  CHECK(fastopt::norm_finish(A(6.25), fastopt::kMaxAbs, A(kInf)) == A(6.25), t);
  CHECK(fastopt::norm_finish(A(6.25), fastopt::kNoNorm, A(2)) == A(6.25), t);
  for (NormKind kind : {fastopt::kSumAbs, fastopt::kSumSquares, fastopt::kSumPowers, fastopt::kMaxAbs})
    CHECK(fastopt::norm_finish(A(0), kind, A(kind == fastopt::kSumPowers ? 3 : 2)) == A(0), t, " empty norm, kind ", kind);
}

template <typename A>
void test_norm_random(uint32_t seed) {
  const std::string t = type_name<A>();
  std::mt19937 rng(seed);
  // A sum of n positive terms in A: relative error at most about n * epsilon; the p-th root then
  // divides it by p (and multiplies it for p < 1). Double carries no rounding of its own here.
  const double epsilon = std::numeric_limits<A>::epsilon();
  for (size_t count : {1u, 2u, 7u, 100u, 1000u, 4099u}) {
    const std::vector<A> values = random_values<A>(rng, count);
    for (double p : {1.0, 2.0, 3.0, 0.5, 1.5, kInf}) {
      const NormKind kind = fastopt::norm_kind(p);
      const double expected = expected_norm(values, p);
      const double rtol = std::isinf(p) ? 0.0 : (8.0 + static_cast<double>(count)) * epsilon * std::max(1.0, 1.0 / p);
      for (bool pairwise : {false, true}) {
        const A actual = norm_through_header(values, kind, static_cast<A>(p), pairwise);
        CHECK_CLOSE(actual, expected, rtol * expected, t, " n = ", count, " p = ", p, " pairwise = ", pairwise);
        CHECK(std::isfinite(actual) && actual > A(0), t, " n = ", count, " p = ", p);
      }
    }
  }
}

template <typename A>
void test_norm_nonfinite(uint32_t seed) {
  const std::string t = type_name<A>();
  std::mt19937 rng(seed);
  const A nan = std::numeric_limits<A>::quiet_NaN(), inf = std::numeric_limits<A>::infinity();
  const NormKind kinds[] = {fastopt::kSumAbs, fastopt::kSumSquares, fastopt::kSumPowers, fastopt::kMaxAbs};
  const A powers[] = {A(1), A(2), A(3), inf};
  for (size_t position : {size_t{0}, size_t{17}, size_t{63}}) {
    std::vector<A> with_nan = random_values<A>(rng, 64), with_inf = with_nan, with_both = with_nan;
    with_nan[position] = nan;
    with_inf[position] = -inf;
    with_both[position] = inf;
    with_both[(position + 5) % 64] = nan;
    for (int k = 0; k < 4; ++k) {
      for (bool pairwise : {false, true}) {
        CHECK(std::isnan(norm_through_header(with_nan, kinds[k], powers[k], pairwise)), t, " nan at ", position,
              " kind ", kinds[k], " pairwise ", pairwise);
        CHECK(norm_through_header(with_inf, kinds[k], powers[k], pairwise) == inf, t, " -inf at ", position, " kind ",
              kinds[k], " pairwise ", pairwise);
        CHECK(std::isnan(norm_through_header(with_both, kinds[k], powers[k], pairwise)), t, " inf and nan, kind ",
              kinds[k], " pairwise ", pairwise);
      }
      CHECK(std::isnan(fastopt::norm_contribution(nan, kinds[k], powers[k])), t, " contribution of nan, kind ", kinds[k]);
    }
    // p = 0.5 too.
    CHECK(std::isnan(norm_through_header(with_nan, fastopt::kSumPowers, A(0.5), false)), t, " nan, p = 0.5");
    CHECK(norm_through_header(with_inf, fastopt::kSumPowers, A(0.5), false) == inf, t, " inf, p = 0.5");
  }
  // The max of partials propagates nan whichever side it is on, also next to inf.
  CHECK(std::isnan(fastopt::norm_combine(nan, A(5), fastopt::kMaxAbs)), t, " nan left");
  CHECK(std::isnan(fastopt::norm_combine(A(5), nan, fastopt::kMaxAbs)), t, " nan right");
  CHECK(std::isnan(fastopt::norm_combine(inf, nan, fastopt::kMaxAbs)), t, " inf, nan");
  CHECK(std::isnan(fastopt::norm_combine(nan, inf, fastopt::kMaxAbs)), t, " nan, inf");
  CHECK(std::isnan(fastopt::norm_combine(A(0), nan, fastopt::kMaxAbs)), t, " 0, nan (the initial accumulator)");
  CHECK(std::isnan(fastopt::norm_combine(nan, A(1), fastopt::kSumSquares)), t, " sum, nan left");
  CHECK(std::isnan(fastopt::norm_combine(A(1), nan, fastopt::kSumPowers)), t, " sum, nan right");
  CHECK(std::isnan(fastopt::norm_finish(nan, fastopt::kSumSquares, A(2))), t, " finish nan");
  CHECK(std::isnan(fastopt::norm_finish(nan, fastopt::kSumPowers, A(3))), t, " finish nan p = 3");
  CHECK(fastopt::norm_finish(inf, fastopt::kSumPowers, A(0.5)) == inf, t, " finish inf p = 0.5");
}

// --------------------------------------------------------------------------- clamp_symmetric

template <typename A>
void test_clamp_symmetric(uint32_t seed) {
  const std::string t = type_name<A>();
  const A nan = std::numeric_limits<A>::quiet_NaN(), inf = std::numeric_limits<A>::infinity();
  CHECK(fastopt::clamp_symmetric(A(0.75), A(1)) == A(0.75), t);
  CHECK(fastopt::clamp_symmetric(A(-0.75), A(1)) == A(-0.75), t);
  CHECK(fastopt::clamp_symmetric(A(2.5), A(1)) == A(1), t);
  CHECK(fastopt::clamp_symmetric(A(-2.5), A(1)) == A(-1), t);
  CHECK(fastopt::clamp_symmetric(A(1), A(1)) == A(1), t, " at the limit");
  CHECK(fastopt::clamp_symmetric(A(-1), A(1)) == A(-1), t, " at the negative limit");
  CHECK(fastopt::clamp_symmetric(inf, A(3)) == A(3), t, " inf");
  CHECK(fastopt::clamp_symmetric(-inf, A(3)) == A(-3), t, " -inf");
  CHECK(std::isnan(fastopt::clamp_symmetric(nan, A(3))), t, " nan stays nan");
  CHECK(fastopt::clamp_symmetric(A(5), A(0)) == A(0), t, " zero limit");
  CHECK(fastopt::clamp_symmetric(A(-5), A(0)) == A(0), t, " zero limit, negative x");
  // An infinite limit clamps nothing, infinities included.
  CHECK(fastopt::clamp_symmetric(A(1e30), inf) == A(1e30), t, " inf limit");
  CHECK(fastopt::clamp_symmetric(A(-1e30), inf) == A(-1e30), t, " inf limit");
  CHECK(fastopt::clamp_symmetric(inf, inf) == inf, t, " inf limit, inf x");
  CHECK(fastopt::clamp_symmetric(-inf, inf) == -inf, t, " inf limit, -inf x");
  CHECK(std::isnan(fastopt::clamp_symmetric(nan, inf)), t, " inf limit, nan x");
  // A nan limit: every comparison is false, so x passes through unchanged. (torch.clamp with a nan
  // bound gives nan; the callers reject a nan clip_value before it gets here: host_runtime.cpp checks
  // clip_value >= 0 and fastopt.ops rejects nan.)
  CHECK(fastopt::clamp_symmetric(A(2.5), nan) == A(2.5), t, " nan limit passes x through");
  CHECK(fastopt::clamp_symmetric(A(-2.5), nan) == A(-2.5), t, " nan limit passes x through");

  std::mt19937 rng(seed);
  const std::vector<A> values = random_values<A>(rng, 2000);
  std::uniform_real_distribution<double> limits(0.0, 5.0);
  int inside = 0, above = 0, below = 0;
  for (A x : values) {
    const A limit = static_cast<A>(limits(rng));
    const A clamped = fastopt::clamp_symmetric(x, limit);
    const double expected = std::min(std::max(static_cast<double>(x), -static_cast<double>(limit)), static_cast<double>(limit));
    CHECK(clamped == static_cast<A>(expected), t, " x = ", x, " limit = ", limit);
    inside += (x >= -limit && x <= limit);
    above += x > limit;
    below += x < -limit;
  }
  CHECK(inside > 100 && above > 100 && below > 100, t, " the random cases cover all three branches: ", inside, " ",
        above, " ", below);
}

// --------------------------------------------------------------------------- agc_coefficient

template <typename A>
void test_agc_coefficient(uint32_t seed) {
  const std::string t = type_name<A>();
  const A nan = std::numeric_limits<A>::quiet_NaN(), inf = std::numeric_limits<A>::infinity();
  const double rtol = sizeof(A) == sizeof(float) ? 3e-7 : 5e-16;
  // Above the threshold: max_norm = 2 * 0.01 = 0.02, grad norm 0.5 -> 0.04.
  CHECK_CLOSE(fastopt::agc_coefficient(A(2), A(0.5), A(0.01), A(1e-3)), 0.04, 0.04 * rtol, t, " above");
  // Below: max_norm = 100 * 0.01 = 1 > 0.5 -> unchanged.
  CHECK(fastopt::agc_coefficient(A(100), A(0.5), A(0.01), A(1e-3)) == A(1), t, " below");
  // At the threshold exactly (max_norm = 2 * 0.5 = 1 = grad norm): not above, unchanged.
  CHECK(fastopt::agc_coefficient(A(2), A(1), A(0.5), A(1e-3)) == A(1), t, " at the threshold");
  // A zero weight norm is floored at eps: max_norm = 1e-3 * 0.01 = 1e-5, grad norm 1 -> 1e-5.
  CHECK_CLOSE(fastopt::agc_coefficient(A(0), A(1), A(0.01), A(1e-3)), 1e-5, 1e-5 * 2 * rtol, t, " zero weight norm");
  // So is a weight norm below eps (1e-4 < 1e-3).
  CHECK_CLOSE(fastopt::agc_coefficient(A(1e-4), A(1), A(0.01), A(1e-3)), 1e-5, 1e-5 * 2 * rtol, t, " weight norm < eps");
  // A weight norm just above eps is used as is: 2e-3 * 0.01 / 1 = 2e-5.
  CHECK_CLOSE(fastopt::agc_coefficient(A(2e-3), A(1), A(0.01), A(1e-3)), 2e-5, 2e-5 * 2 * rtol, t, " weight norm > eps");
  // A tiny grad norm above a tinier max_norm is floored at 1e-6 in the division:
  // max_norm = 1e-10 * 0.01 = 1e-12, grad norm 1e-8 -> 1e-12 / 1e-6 = 1e-6 (not 1e-4).
  CHECK_CLOSE(fastopt::agc_coefficient(A(0), A(1e-8), A(0.01), A(1e-10)), 1e-6, 1e-6 * 4 * rtol, t,
              " grad norm floored at 1e-6");
  // ... and just above the floor it is not floored: 1e-12 / 2e-6 = 5e-7.
  CHECK_CLOSE(fastopt::agc_coefficient(A(0), A(2e-6), A(0.01), A(1e-10)), 5e-7, 5e-7 * 4 * rtol, t,
              " grad norm above the floor");
  // A tiny grad norm below max_norm: unchanged.
  CHECK(fastopt::agc_coefficient(A(1), A(1e-8), A(0.01), A(1e-3)) == A(1), t, " tiny grad norm below");
  // A zero grad norm: unchanged.
  CHECK(fastopt::agc_coefficient(A(0), A(0), A(0.01), A(1e-3)) == A(1), t, " zero grad norm");
  // An infinite grad norm: scaled to 0 (as reference.py: max_norm / inf).
  CHECK(fastopt::agc_coefficient(A(1), inf, A(0.01), A(1e-3)) == A(0), t, " inf grad norm");
  // A nan grad norm: nan > max_norm is false, unchanged (as reference.py's torch.where).
  CHECK(fastopt::agc_coefficient(A(1), nan, A(0.01), A(1e-3)) == A(1), t, " nan grad norm");
  // A nan weight norm: reference.py forms max_norm = nan.clamp_min(eps) * c = nan (torch's clamp
  // keeps nan), then where(grad_norm > nan, ..., 1) = 1: no clipping, the grad left as it is.
  CHECK(fastopt::agc_coefficient(nan, A(1), A(0.01), A(1e-3)) == A(1), t, " nan weight norm: no clipping");
  CHECK(fastopt::agc_coefficient(nan, A(1e-9), A(0.01), A(1e-3)) == A(1), t, " nan weight norm, tiny grad norm");
  CHECK(fastopt::agc_coefficient(nan, nan, A(0.01), A(1e-3)) == A(1), t, " nan weight and grad norms");
  // An infinite weight norm: nothing is above it.
  CHECK(fastopt::agc_coefficient(inf, A(1e30), A(0.01), A(1e-3)) == A(1), t, " inf weight norm");

  // Random norms over many magnitudes against the formula in double.
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> exponent(-9.0, 3.0);
  int clipped = 0, unchanged = 0;
  for (int i = 0; i < 4000; ++i) {
    const A weight_norm = i % 50 == 0 ? A(0) : static_cast<A>(std::pow(10.0, exponent(rng)));
    const A grad_norm = static_cast<A>(std::pow(10.0, exponent(rng)));
    const A clip_factor = static_cast<A>(std::pow(10.0, exponent(rng) / 3.0));
    const A eps = static_cast<A>(std::pow(10.0, exponent(rng) / 2.0 - 2.0));
    const A coefficient = fastopt::agc_coefficient(weight_norm, grad_norm, clip_factor, eps);
    // max_norm as the header forms it (one rounding in A), then the decision and the division in double.
    const A max_norm = static_cast<A>(std::max(static_cast<double>(weight_norm), static_cast<double>(eps)) *
                                      static_cast<double>(clip_factor));
    const double expected = static_cast<double>(grad_norm) > static_cast<double>(max_norm)
                                ? static_cast<double>(max_norm) / std::max(static_cast<double>(grad_norm), 1e-6)
                                : 1.0;
    CHECK_CLOSE(coefficient, expected, expected * 2 * rtol + 1e-300, t, " weight ", weight_norm, " grad ", grad_norm,
                " clip ", clip_factor, " eps ", eps);
    CHECK(coefficient > A(0) && coefficient <= A(1), t, " coefficient in (0, 1]");
    // Clipped, the new grad norm is max_norm (or less, when the 1e-6 floor applies).
    if (coefficient < A(1)) {
      ++clipped;
      CHECK(static_cast<double>(coefficient) * static_cast<double>(grad_norm) <=
                static_cast<double>(max_norm) * (1 + 4 * rtol),
            t, " clipped norm <= max_norm");
    } else {
      ++unchanged;
    }
  }
  CHECK(clipped > 500 && unchanged > 500, t, " random cases cover both branches: ", clipped, " ", unchanged);
}

// --------------------------------------------------------------------------------------- lerp

template <typename A>
void test_lerp(uint32_t seed) {
  const std::string t = type_name<A>();
  CHECK(fastopt::lerp(A(1), A(3), A(0.25)) == A(1.5), t);
  CHECK(fastopt::lerp(A(1), A(3), A(0.75)) == A(2.5), t);
  CHECK(fastopt::lerp(A(-2), A(6), A(0.5)) == A(2), t);
  CHECK(fastopt::lerp(A(10), A(-10), A(0.1)) == A(10) + A(0.1) * A(-20), t);
  CHECK(fastopt::lerp(A(10), A(-10), A(0.9)) == A(-10) - A(-20) * (A(1) - A(0.9)), t);

  std::mt19937 rng(seed);
  const std::vector<A> starts = random_values<A>(rng, 3000), ends = random_values<A>(rng, 3000);
  std::uniform_real_distribution<double> weights(0.0, 1.0);
  int low = 0, high = 0;
  for (size_t i = 0; i < starts.size(); ++i) {
    const A start = starts[i], end = ends[i];
    // Exact at both ends.
    CHECK(fastopt::lerp(start, end, A(0)) == start, t, " weight 0: ", start, " -> ", end);
    CHECK(fastopt::lerp(start, end, A(1)) == end, t, " weight 1: ", start, " -> ", end);
    // Inside: start + w (end - start) up to rounding: within two ulps (of the larger endpoint) of
    // the exact value in long double (seen: one), and within four of the naive formula in A
    // (which itself may be 2.5 ulps off).
    A weight = static_cast<A>(weights(rng));
    if (i % 10 == 0) weight = A(0.5);
    const A actual = fastopt::lerp(start, end, weight);
    const long double exact = static_cast<long double>(start) +
                              static_cast<long double>(weight) * (static_cast<long double>(end) - static_cast<long double>(start));
    const A naive = start + weight * (end - start);
    const double tolerance = 2.0 * static_cast<double>(ulp(std::max(std::fabs(start), std::fabs(end))));
    CHECK_CLOSE(actual, static_cast<double>(exact), tolerance, t, " lerp(", start, ", ", end, ", ", weight, ")");
    CHECK_CLOSE(actual, naive, 2 * tolerance, t, " naive lerp(", start, ", ", end, ", ", weight, ")");
    // Between the ends.
    CHECK(actual >= std::min(start, end) && actual <= std::max(start, end), t, " lerp(", start, ", ", end, ", ", weight,
          ") = ", actual, " between the ends");
    (weight < A(0.5) ? low : high) += 1;
  }
  CHECK(low > 1000 && high > 1000, t, " both branches: ", low, " ", high);
}

// -------------------------------------------------------------------- adamw_constants

template <typename A>
void test_adamw_constants() {
  const std::string t = type_name<A>();
  struct Case {
    double lr, beta1, beta2, eps, weight_decay, step;
    double bias_correction2_sqrt, neg_step_size;  // literals, computed to 40 digits in decimal
  };
  const Case cases[] = {
      {1e-3, 0.9, 0.999, 1e-8, 1e-2, 1, 0.03162277660168379332, -0.01},
      {1e-3, 0.9, 0.999, 1e-8, 1e-2, 10, 0.09977534660552069523, -0.001535339932787629498},
      {1e-2, 0.8, 0.95, 1e-6, 0.1, 1, 0.2236067977499789696, -0.05},
      {1e-2, 0.8, 0.95, 1e-6, 0.1, 10, 0.6334532822249965213, -0.01120290249601671391},
  };
  for (const Case& c : cases) {
    const auto k = fastopt::adamw_constants<A>(c.lr, c.beta1, c.beta2, c.eps, c.weight_decay, c.step);
    // The direct formulas in double, then rounded once to A (as the header does).
    const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(c.beta2, c.step));
    const double neg_step_size = -c.lr / (1.0 - std::pow(c.beta1, c.step));
    const double decay_factor = 1.0 - c.lr * c.weight_decay;
    CHECK(k.bias_correction2_sqrt == static_cast<A>(bias_correction2_sqrt), t, " bc2 step ", c.step);
    CHECK(k.neg_step_size == static_cast<A>(neg_step_size), t, " step size step ", c.step);
    CHECK(k.decay_factor == static_cast<A>(decay_factor), t, " decay step ", c.step);
    CHECK(k.one_minus_beta1 == static_cast<A>(1.0 - c.beta1), t);
    CHECK(k.beta2 == static_cast<A>(c.beta2), t);
    CHECK(k.one_minus_beta2 == static_cast<A>(1.0 - c.beta2), t);
    CHECK(k.eps == static_cast<A>(c.eps), t);
    // The literals (independent of std::pow): within a few ulps of the rounded type (beta2 = 0.999
    // is not exact in binary, so 1 - beta2 carries a relative error of ~1e-13 in double).
    const double rtol = sizeof(A) == sizeof(float) ? 2e-7 : 1e-12;
    CHECK_CLOSE(k.bias_correction2_sqrt, c.bias_correction2_sqrt, rtol * c.bias_correction2_sqrt, t, " bc2 literal, step ",
                c.step);
    CHECK_CLOSE(k.neg_step_size, c.neg_step_size, rtol * std::fabs(c.neg_step_size), t, " step size literal, step ", c.step);
    CHECK_CLOSE(k.decay_factor, 1.0 - c.lr * c.weight_decay, rtol, t, " decay literal");
  }
  // decay_factor literals: 1 - 1e-3 * 1e-2 = 0.99999; 1 - 1e-2 * 0.1 = 0.999.
  CHECK_CLOSE(fastopt::adamw_constants<A>(1e-3, 0.9, 0.999, 1e-8, 1e-2, 1).decay_factor, 0.99999, 1e-7, t);
  CHECK_CLOSE(fastopt::adamw_constants<A>(1e-2, 0.8, 0.95, 1e-6, 0.1, 1).decay_factor, 0.999, 1e-7, t);
  CHECK(fastopt::adamw_constants<A>(1e-3, 0.9, 0.999, 1e-8, 0.0, 3).decay_factor == A(1), t, " no weight decay");
  // Late steps: the bias corrections tend to 1, the step size to -lr.
  const auto late = fastopt::adamw_constants<A>(1e-3, 0.9, 0.999, 1e-8, 0.0, 1e6);
  CHECK(late.bias_correction2_sqrt == A(1), t, " bc2 at step 1e6");
  CHECK(late.neg_step_size == A(-1e-3), t, " step size at step 1e6");
}

// ----------------------------------------------------------------------- effective_grad

template <typename A>
void test_effective_grad(uint32_t seed) {
  const std::string t = type_name<A>();
  // 3 / 1024 * 0.5 = 0.00146484375 exactly.
  CHECK(fastopt::effective_grad(A(3), A(1024), A(0.5), false) == A(0.00146484375), t);
  CHECK(fastopt::effective_grad(A(3), A(1024), A(0.5), true) == A(-0.00146484375), t, " maximize");
  CHECK(fastopt::effective_grad(A(-2.5), A(1), A(1), false) == A(-2.5), t, " identity");
  CHECK(fastopt::effective_grad(A(-2.5), A(1), A(1), true) == A(2.5), t, " maximize negates");
  CHECK(std::isinf(fastopt::effective_grad(std::numeric_limits<A>::infinity(), A(65536), A(0.5), false)), t, " inf");
  CHECK(std::isnan(fastopt::effective_grad(std::numeric_limits<A>::quiet_NaN(), A(65536), A(0.5), true)), t, " nan");

  std::mt19937 rng(seed);
  const std::vector<A> grads = random_values<A>(rng, 1000);
  std::uniform_real_distribution<double> exponent(-4.0, 16.0), coefficients(1e-3, 1.0);
  const double rtol = 2.0 * std::numeric_limits<A>::epsilon();  // two roundings
  for (size_t i = 0; i < grads.size(); ++i) {
    const A grad_scale = static_cast<A>(std::pow(2.0, std::floor(exponent(rng))) * (i % 3 == 0 ? 1.0 : 1.5));
    const A clip_coef = i % 7 == 0 ? A(1) : static_cast<A>(coefficients(rng));
    const bool maximize = i % 2 == 1;
    const double value = static_cast<double>(grads[i]) / static_cast<double>(grad_scale) * static_cast<double>(clip_coef);
    const double expected = maximize ? -value : value;
    CHECK_CLOSE(fastopt::effective_grad(grads[i], grad_scale, clip_coef, maximize), expected, rtol * std::fabs(expected),
                t, " g ", grads[i], " scale ", grad_scale, " clip ", clip_coef, " maximize ", maximize);
  }

  // By the exact inverse of a power-of-two scale: effective_grad's bits, subnormal results too.
  CHECK(fastopt::has_exact_inverse(1.0) && fastopt::has_exact_inverse(-1.0) && fastopt::has_exact_inverse(65536.0), t);
  CHECK(fastopt::has_exact_inverse(std::ldexp(1.0, 120)) && fastopt::has_exact_inverse(std::ldexp(-1.0, -120)), t);
  CHECK(!fastopt::has_exact_inverse(1000.0) && !fastopt::has_exact_inverse(1.5) && !fastopt::has_exact_inverse(0.0), t);
  CHECK(!fastopt::has_exact_inverse(std::ldexp(1.0, 127)) && !fastopt::has_exact_inverse(std::ldexp(1.0, -127)), t,
        " an inverse out of the float normal range");
  CHECK(!fastopt::has_exact_inverse(std::numeric_limits<double>::infinity()) &&
            !fastopt::has_exact_inverse(std::numeric_limits<double>::quiet_NaN()),
        t);
  std::uniform_int_distribution<int> power(-124, 125);
  for (size_t i = 0; i < grads.size(); ++i) {
    const double scale = std::ldexp(i % 2 == 0 ? 1.0 : -1.0, power(rng));
    const A clip_coef = static_cast<A>(coefficients(rng));
    const A by_division = fastopt::effective_grad(grads[i], A(scale), clip_coef, false);
    const A by_inverse = fastopt::effective_grad_by_inverse(grads[i], A(1.0 / scale), clip_coef);
    CHECK(fastopt::has_exact_inverse(scale) && by_inverse == by_division, t, " g ", grads[i],
          " scale ", scale, " clip ", clip_coef);
  }
}

// ------------------------------------------------------------------------------ adamw_update

struct Hyper {
  double lr, beta1, beta2, eps, weight_decay;
};

// torch.optim.AdamW's single-tensor math (foreach=False, fused=False, capturable=False), one
// element, written out: decoupled weight decay, the moments, the bias corrections from the step
// count (in double, as torch forms them on the host), then p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps).
// It also carries `scale_*`: the size of the terms each value is made of, so that rounding
// differences are judged against what they can be (not against a value that cancelled to ~0).
template <typename A>
struct Reference {
  A param, exp_avg, exp_avg_sq, max_exp_avg_sq;
  double scale_param, scale_exp_avg;

  void step(A grad, const Hyper& h, double step_count, bool amsgrad) {
    param = param * static_cast<A>(1.0 - h.lr * h.weight_decay);
    scale_param *= 1.0 - h.lr * h.weight_decay;
    exp_avg = static_cast<A>(h.beta1) * exp_avg + static_cast<A>(1.0 - h.beta1) * grad;
    scale_exp_avg = h.beta1 * scale_exp_avg + (1.0 - h.beta1) * std::fabs(static_cast<double>(grad));
    exp_avg_sq = static_cast<A>(h.beta2) * exp_avg_sq + static_cast<A>(1.0 - h.beta2) * grad * grad;
    A second_moment = exp_avg_sq;
    if (amsgrad) {
      max_exp_avg_sq = std::max(max_exp_avg_sq, exp_avg_sq);
      second_moment = max_exp_avg_sq;
    }
    const double bias_correction1 = 1.0 - std::pow(h.beta1, step_count);
    const double bias_correction2 = 1.0 - std::pow(h.beta2, step_count);
    const A step_size = static_cast<A>(h.lr / bias_correction1);
    const A denom = std::sqrt(second_moment) / static_cast<A>(std::sqrt(bias_correction2)) + static_cast<A>(h.eps);
    param = param - step_size * (exp_avg / denom);
    scale_param += static_cast<double>(step_size) * scale_exp_avg / static_cast<double>(denom);
  }
};

// Runs fastopt::adamw_update (in A) and the Reference (in R) side by side from the same random
// state for `steps` steps with fresh random grads each step, and compares every state value
// after each step within rtol of its scale.
template <typename A, typename R>
void compare_adamw(uint32_t seed, const Hyper& h, bool amsgrad, bool fresh, double first_step, int steps, double rtol,
                   const std::string& label) {
  std::mt19937 rng(seed);
  const size_t count = 257;
  const std::vector<A> params = random_values<A>(rng, count);
  std::vector<A> exp_avgs(count, A(0)), exp_avg_sqs(count, A(0)), max_exp_avg_sqs(count, A(0));
  if (!fresh) {  // a resumed state: random moments, and a max that is above v for some elements
    exp_avgs = random_values<A>(rng, count);
    std::uniform_real_distribution<double> spread(0.25, 4.0);
    for (size_t i = 0; i < count; ++i) {
      exp_avg_sqs[i] = static_cast<A>(static_cast<double>(exp_avgs[i]) * static_cast<double>(exp_avgs[i]) * spread(rng));
      max_exp_avg_sqs[i] = static_cast<A>(static_cast<double>(exp_avg_sqs[i]) * spread(rng));
    }
  }
  std::vector<Reference<R>> reference(count);
  for (size_t i = 0; i < count; ++i)
    reference[i] = {static_cast<R>(params[i]), static_cast<R>(exp_avgs[i]), static_cast<R>(exp_avg_sqs[i]),
                    static_cast<R>(max_exp_avg_sqs[i]), std::fabs(static_cast<double>(params[i])),
                    std::fabs(static_cast<double>(exp_avgs[i]))};
  std::vector<A> actual_params = params;

  std::uniform_real_distribution<double> scales(0.5, 2.0);
  int64_t max_seen_above_v = 0;
  for (int s = 0; s < steps; ++s) {
    const double step_count = first_step + s;
    const auto constants = fastopt::adamw_constants<A>(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step_count);
    // Grads of varied magnitude; a per-step factor so that v rises and falls (and AMSGrad's max matters).
    const std::vector<A> grads = random_values<A>(rng, count);
    const double step_factor = scales(rng) * (s % 3 == 2 ? 0.1 : 1.0);
    for (size_t i = 0; i < count; ++i) {
      const A grad = static_cast<A>(static_cast<double>(grads[i]) * step_factor);
      fastopt::adamw_update(actual_params[i], grad, exp_avgs[i], exp_avg_sqs[i], amsgrad ? &max_exp_avg_sqs[i] : nullptr,
                            constants);
      Reference<R>& ref = reference[i];
      ref.step(static_cast<R>(grad), h, step_count, amsgrad);
      const std::string where = check::message(label, " step ", step_count, " element ", i);
      CHECK_CLOSE(actual_params[i], ref.param, rtol * ref.scale_param, where, " param");
      CHECK_CLOSE(exp_avgs[i], ref.exp_avg, rtol * ref.scale_exp_avg, where, " exp_avg");
      CHECK_CLOSE(exp_avg_sqs[i], ref.exp_avg_sq, rtol * static_cast<double>(ref.exp_avg_sq), where, " exp_avg_sq");
      if (amsgrad) {
        CHECK_CLOSE(max_exp_avg_sqs[i], ref.max_exp_avg_sq, rtol * static_cast<double>(ref.max_exp_avg_sq), where,
                    " max_exp_avg_sq");
        max_seen_above_v += ref.max_exp_avg_sq > ref.exp_avg_sq;
      }
      // Random, non-zero data stays finite through every step.
      CHECK(std::isfinite(actual_params[i]), where, " finite");
    }
  }
  if (amsgrad) CHECK(max_seen_above_v > 100, label, ": AMSGrad's max differs from v often enough (", max_seen_above_v, ")");
}

template <typename A>
void test_adamw_update(uint32_t seed) {
  const std::string t = type_name<A>();
  const bool is_float = sizeof(A) == sizeof(float);
  // Relative to the size of the terms each value is made of (Reference::scale_*). The reference
  // in the same precision rounds differently (beta1 * m + (1 - beta1) * g vs lerp, step_size *
  // (m / denom) vs (-step_size * m) / denom), and the differences of 12 steps add up: seen at
  // most 6.8e-7 (float) and 8e-16 (double) here, so 2e-6 leaves room for another standard
  // library's random draws. Against the reference in double, float's whole rounding: seen 8.7e-7.
  const double rtol_same = is_float ? 2e-6 : 1e-13;
  const Hyper hypers[] = {{1e-3, 0.9, 0.999, 1e-8, 1e-2}, {5e-2, 0.8, 0.95, 1e-6, 0.1}, {1e-2, 0.5, 0.9, 1e-3, 0.0}};
  uint32_t run = 0;
  for (const Hyper& h : hypers) {
    for (bool amsgrad : {false, true}) {
      for (bool fresh : {true, false}) {
        const double first_step = fresh ? 1.0 : 7.0;
        const std::string label = check::message(t, " lr ", h.lr, " betas ", h.beta1, ",", h.beta2, " amsgrad ", amsgrad,
                                                 fresh ? " fresh" : " resumed");
        compare_adamw<A, A>(seed + run, h, amsgrad, fresh, first_step, 12, rtol_same, label);
        // Against the reference in double as well (float: the whole trajectory's rounding).
        compare_adamw<A, double>(seed + run, h, amsgrad, fresh, first_step, 12, is_float ? 4e-6 : 1e-13,
                                 label + " vs double");
        ++run;
      }
    }
  }

  // One step by hand: p = 1, g = 0.5, m = v = 0, step 1, lr = 0.1, betas (0.9, 0.999), eps = 0,
  // wd = 0.5: p -> 0.95; m = 0.05, v = 0.00025; m / bc1 = 0.5, sqrt(v / bc2) = 0.5 -> p = 0.95 - 0.1.
  {
    A param = A(1), exp_avg = A(0), exp_avg_sq = A(0);
    const auto c = fastopt::adamw_constants<A>(0.1, 0.9, 0.999, 0.0, 0.5, 1);
    fastopt::adamw_update(param, A(0.5), exp_avg, exp_avg_sq, static_cast<A*>(nullptr), c);
    const double tol = is_float ? 1e-6 : 1e-14;
    CHECK_CLOSE(param, 0.85, tol, t, " hand step param");
    CHECK_CLOSE(exp_avg, 0.05, tol * 0.05, t, " hand step exp_avg");
    CHECK_CLOSE(exp_avg_sq, 0.00025, tol * 0.00025, t, " hand step exp_avg_sq");
  }
  // AMSGrad with a max above v: the max is kept and used. p = 1, g = 0.5, v0 = 0, vmax0 = 1,
  // step 1, betas (0.9, 0.999), lr = 0.1, eps = 0, wd = 0: v = 0.00025 < vmax = 1 ->
  // denom = 1 / sqrt(0.001), p = 1 - 0.1 * 0.5 * sqrt(0.001).
  {
    A param = A(1), exp_avg = A(0), exp_avg_sq = A(0), max_exp_avg_sq = A(1);
    const auto c = fastopt::adamw_constants<A>(0.1, 0.9, 0.999, 0.0, 0.0, 1);
    fastopt::adamw_update(param, A(0.5), exp_avg, exp_avg_sq, &max_exp_avg_sq, c);
    const double tol = is_float ? 1e-6 : 1e-14;
    CHECK(max_exp_avg_sq == A(1), t, " AMSGrad keeps the larger max");
    CHECK_CLOSE(param, 1.0 - 0.05 * std::sqrt(1.0 - 0.999), tol, t, " AMSGrad uses the max");
  }
  // lr = 0 changes no param (and still updates the moments).
  {
    A param = A(0.3), exp_avg = A(0.1), exp_avg_sq = A(0.2);
    const auto c = fastopt::adamw_constants<A>(0.0, 0.9, 0.999, 1e-8, 0.1, 4);
    fastopt::adamw_update(param, A(-0.7), exp_avg, exp_avg_sq, static_cast<A*>(nullptr), c);
    CHECK(param == A(0.3), t, " lr = 0 keeps the param");
    CHECK(exp_avg != A(0.1) && exp_avg_sq != A(0.2), t, " lr = 0 still moves the moments");
  }
  // A nan or inf grad propagates to the param and the moments (and AMSGrad's max).
  for (A bad : {std::numeric_limits<A>::quiet_NaN(), std::numeric_limits<A>::infinity()}) {
    A param = A(0.3), exp_avg = A(0.1), exp_avg_sq = A(0.2), max_exp_avg_sq = A(0.4);
    const auto c = fastopt::adamw_constants<A>(1e-3, 0.9, 0.999, 1e-8, 0.01, 3);
    fastopt::adamw_update(param, bad, exp_avg, exp_avg_sq, &max_exp_avg_sq, c);
    CHECK(!std::isfinite(param) && !std::isfinite(exp_avg) && !std::isfinite(exp_avg_sq) && !std::isfinite(max_exp_avg_sq),
          t, " a grad of ", bad, " gives param ", param, " m ", exp_avg, " v ", exp_avg_sq, " vmax ", max_exp_avg_sq);
    CHECK(std::isnan(bad) ? std::isnan(param) && std::isnan(max_exp_avg_sq) : true, t, " nan grad -> nan param and max");
  }
  // A nan already in AMSGrad's max stays (torch.maximum propagates nan).
  {
    A param = A(0.3), exp_avg = A(0.1), exp_avg_sq = A(0.2), max_exp_avg_sq = std::numeric_limits<A>::quiet_NaN();
    const auto c = fastopt::adamw_constants<A>(1e-3, 0.9, 0.999, 1e-8, 0.01, 3);
    fastopt::adamw_update(param, A(0.5), exp_avg, exp_avg_sq, &max_exp_avg_sq, c);
    CHECK(std::isnan(max_exp_avg_sq) && std::isnan(param), t, " a nan max propagates");
  }

  // With effective_grad: a maximizing, unscaled, clipped step equals the plain step on -g / s * c.
  {
    std::mt19937 rng(seed + 1000);
    const std::vector<A> params = random_values<A>(rng, 64), grads = random_values<A>(rng, 64);
    const auto c = fastopt::adamw_constants<A>(1e-3, 0.9, 0.999, 1e-8, 0.01, 5);
    for (size_t i = 0; i < params.size(); ++i) {
      A p1 = params[i], m1 = A(0.01), v1 = A(0.02), p2 = params[i], m2 = A(0.01), v2 = A(0.02);
      fastopt::adamw_update(p1, fastopt::effective_grad(grads[i], A(256), A(0.25), true), m1, v1, static_cast<A*>(nullptr), c);
      fastopt::adamw_update(p2, -(grads[i] / A(256) * A(0.25)), m2, v2, static_cast<A*>(nullptr), c);
      CHECK(p1 == p2 && m1 == m2 && v1 == v2, t, " effective_grad in the update, element ", i);
    }
  }
}


// ------------------------------------------------------------------- Adam's L2 (adamw_update<A, true>)

// torch.optim.Adam's single-tensor math, one step of one element, in double: g += wd * p (the
// param itself not decayed), then AdamW's moments and update.
struct AdamL2Expected {
  double param, exp_avg, exp_avg_sq, scale_param;
};
AdamL2Expected adam_l2_double(double p, double g, double m, double v, const Hyper& h, double step) {
  g += h.weight_decay * p;
  m = h.beta1 * m + (1.0 - h.beta1) * g;
  v = h.beta2 * v + (1.0 - h.beta2) * g * g;
  const double step_size = h.lr / (1.0 - std::pow(h.beta1, step));
  const double update = step_size * m / (std::sqrt(v) / std::sqrt(1.0 - std::pow(h.beta2, step)) + h.eps);
  return {p - update, m, v, std::fabs(p) + std::fabs(update)};
}

template <typename A>
void test_adam_l2_update(uint32_t seed) {
  const std::string t = type_name<A>();
  // The constants: no decay of the param, the L2 term carries weight_decay; AdamW's carry no L2.
  const auto l2 = fastopt::adamw_constants<A>(1e-2, 0.9, 0.999, 1e-8, 0.25, 3, /*decoupled=*/false);
  CHECK(l2.decay_factor == A(1) && l2.l2_weight_decay == A(0.25), t, " Adam's constants");
  const auto decoupled = fastopt::adamw_constants<A>(1e-2, 0.9, 0.999, 1e-8, 0.25, 3);
  CHECK(decoupled.l2_weight_decay == A(0) && decoupled.decay_factor == A(1.0 - 1e-2 * 0.25), t, " AdamW's constants");
  CHECK(fastopt::l2_decayed_grad(A(0.5), A(2), A(0.25)) == A(1), t, " l2_decayed_grad");
  CHECK(fastopt::l2_decayed_grad_fused(A(0.5), A(2), A(0.25)) == A(1), t, " l2_decayed_grad_fused");

  std::mt19937 rng(seed);
  const double rtol = sizeof(A) == sizeof(float) ? 4e-6 : 1e-13;
  const Hyper hypers[] = {{1e-3, 0.9, 0.999, 1e-8, 1e-2}, {5e-2, 0.8, 0.95, 1e-6, 0.5}};
  for (const Hyper& h : hypers) {
    for (double step : {1.0, 9.0}) {
      const auto c = fastopt::adamw_constants<A>(h.lr, h.beta1, h.beta2, h.eps, h.weight_decay, step, false);
      const std::vector<A> params = random_values<A>(rng, 200), grads = random_values<A>(rng, 200),
                           moments = random_values<A>(rng, 200);
      for (size_t i = 0; i < params.size(); ++i) {
        const A m0 = moments[i] * A(0.1), v0 = moments[i] * moments[i];
        const AdamL2Expected e = adam_l2_double(params[i], grads[i], m0, v0, h, step);
        A p = params[i], m = m0, v = v0;
        fastopt::adamw_update<A, true>(p, grads[i], m, v, static_cast<A*>(nullptr), c);
        A pf = params[i], mf = m0, vf = v0;
        fastopt::adamw_update_fused<true, A, true>(pf, grads[i], mf, vf, static_cast<A*>(nullptr), c);
        const std::string where = check::message(t, " lr ", h.lr, " wd ", h.weight_decay, " step ", step, " element ", i);
        for (const auto& [param, exp_avg, exp_avg_sq, name] :
             {std::tuple{p, m, v, "adamw_update<A, true>"}, std::tuple{pf, mf, vf, "adamw_update_fused<.., true>"}}) {
          CHECK_CLOSE(param, e.param, rtol * e.scale_param, where, " ", name, " param");
          CHECK_CLOSE(exp_avg, e.exp_avg, rtol * (std::fabs(e.exp_avg) + std::fabs(grads[i]) + std::fabs(m0)), where, " ",
                      name, " exp_avg");
          CHECK_CLOSE(exp_avg_sq, e.exp_avg_sq, rtol * e.exp_avg_sq, where, " ", name, " exp_avg_sq");
        }
      }
    }
  }
  // L2 decays through the grad only: with a zero grad and zero moments the grad is wd * p, so
  // p = 1, wd = 0.5, lr = 0.1, step 1, eps = 0 -> m / bc1 = 0.5 = sqrt(v / bc2) -> p = 1 - 0.1.
  A param = A(1), exp_avg = A(0), exp_avg_sq = A(0);
  fastopt::adamw_update<A, true>(param, A(0), exp_avg, exp_avg_sq, static_cast<A*>(nullptr),
                                 fastopt::adamw_constants<A>(0.1, 0.9, 0.999, 0.0, 0.5, 1, false));
  CHECK_CLOSE(param, 0.9, sizeof(A) == sizeof(float) ? 1e-6 : 1e-14, t, " hand step of Adam's L2");
}

// -------------------------------------------------------------------------------- sgd_update

// torch.optim.SGD's step in double: g += wd * p; buf = first ? g : momentum * buf + (1 - dampening) * g;
// g = nesterov ? g + momentum * buf : buf (with momentum); p -= lr * g.
struct SGDExpected {
  double param, buffer, scale_param, scale_buffer;
};
SGDExpected sgd_double(double p, double g, double buf, bool with_momentum, double lr, double momentum,
                       double dampening, double wd, bool first, bool nesterov) {
  g += wd * p;
  double scale_g = std::fabs(g) + std::fabs(wd * p);
  double scale_buf = 0.0;
  if (with_momentum) {
    scale_buf = first ? scale_g : std::fabs(momentum * buf) + std::fabs((1.0 - dampening) * g);
    buf = first ? g : momentum * buf + (1.0 - dampening) * g;
    scale_g = nesterov ? scale_g + std::fabs(momentum) * scale_buf : scale_buf;
    g = nesterov ? g + momentum * buf : buf;
  }
  return {p - lr * g, buf, std::fabs(p) + lr * scale_g, scale_buf};
}

template <bool WeightDecay, bool First, bool Nesterov, typename A>
void check_sgd_flags(std::mt19937& rng, const std::string& t) {
  const double lr = 0.05, momentum = 0.9, dampening = 0.1, wd = WeightDecay ? 0.02 : 0.0;
  const auto c = fastopt::sgd_constants<A>(lr, momentum, dampening, wd);
  // Each add rounds once (the fused form: one rounding per fma; the plain form up to two).
  const double rtol = sizeof(A) == sizeof(float) ? 1e-6 : 1e-15;
  const std::vector<A> params = random_values<A>(rng, 100), grads = random_values<A>(rng, 100),
                       buffers = random_values<A>(rng, 100);
  for (bool with_momentum : {false, true}) {
    if (!with_momentum && (First || Nesterov)) continue;  // flags of the momentum only
    for (size_t i = 0; i < params.size(); ++i) {
      const SGDExpected e = sgd_double(params[i], grads[i], buffers[i], with_momentum, lr, momentum, dampening, wd,
                                       First, Nesterov);
      // First: the buffer is only written (nan here: it must not be read).
      const A buffer0 = First ? std::numeric_limits<A>::quiet_NaN() : buffers[i];
      A p = params[i], b = buffer0, pf = params[i], bf = buffer0;
      fastopt::sgd_update<WeightDecay, First, Nesterov>(p, grads[i], with_momentum ? &b : nullptr, c);
      fastopt::sgd_update_fused<WeightDecay, First, Nesterov>(pf, grads[i], with_momentum ? &bf : nullptr, c);
      const std::string where = check::message(t, " wd ", WeightDecay, " first ", First, " nesterov ", Nesterov,
                                               " momentum ", with_momentum, " element ", i);
      CHECK_CLOSE(p, e.param, rtol * e.scale_param, where, " sgd_update param");
      CHECK_CLOSE(pf, e.param, rtol * e.scale_param, where, " sgd_update_fused param");
      if (with_momentum) {
        CHECK_CLOSE(b, e.buffer, rtol * e.scale_buffer, where, " sgd_update buffer");
        CHECK_CLOSE(bf, e.buffer, rtol * e.scale_buffer, where, " sgd_update_fused buffer");
      } else {
        CHECK(std::isnan(b) == std::isnan(buffer0) && (std::isnan(b) || b == buffer0), where, " no buffer touched");
      }
    }
  }
}

template <typename A>
void test_sgd_update(uint32_t seed) {
  const std::string t = type_name<A>();
  std::mt19937 rng(seed);
  check_sgd_flags<false, false, false, A>(rng, t);
  check_sgd_flags<true, false, false, A>(rng, t);
  check_sgd_flags<false, true, false, A>(rng, t);
  check_sgd_flags<true, true, false, A>(rng, t);
  check_sgd_flags<false, false, true, A>(rng, t);
  check_sgd_flags<true, false, true, A>(rng, t);
  check_sgd_flags<false, true, true, A>(rng, t);
  check_sgd_flags<true, true, true, A>(rng, t);

  // By hand: p = 1, g = 0.5, buf = 2, lr = 0.25, momentum = 0.5, dampening = 0.5, wd = 0.5:
  // g = 1; buf = 1 + 0.5 = 1.5; Nesterov g = 1 + 0.75 = 1.75 -> p = 1 - 0.4375 (exact in both types).
  const auto c = fastopt::sgd_constants<A>(0.25, 0.5, 0.5, 0.5);
  for (bool fused : {false, true}) {
    A p = A(1), buf = A(2);
    fused ? fastopt::sgd_update_fused<true, false, true>(p, A(0.5), &buf, c)
          : fastopt::sgd_update<true, false, true>(p, A(0.5), &buf, c);
    CHECK(p == A(0.5625) && buf == A(1.5), t, fused ? " fused" : "", " hand step: p ", p, " buf ", buf);
  }
  // Without weight decay an inf param stays inf (no 0 * inf = nan reaches the grad).
  A p = std::numeric_limits<A>::infinity();
  fastopt::sgd_update_fused<false, false, false>(p, A(1), static_cast<A*>(nullptr), c);
  CHECK(std::isinf(p), t, " inf param without weight decay");
  // The first step sets the buffer to the (decayed) grad, undampened.
  A q = A(1), buf = A(7);
  fastopt::sgd_update_fused<true, true, false>(q, A(0.5), &buf, c);
  CHECK(buf == A(1) && q == A(0.75), t, " first step: buf ", buf, " p ", q);
}

// ------------------------------------------------------------------------------- lion_update

template <typename A>
void test_lion_update(uint32_t seed) {
  const std::string t = type_name<A>();
  CHECK(fastopt::sign_of(A(2.5)) == A(1) && fastopt::sign_of(A(-1e-30)) == A(-1), t, " sign_of");
  CHECK(fastopt::sign_of(A(0)) == A(0) && !std::signbit(fastopt::sign_of(A(0))), t, " sign_of(0)");
  CHECK(fastopt::sign_of(A(-0.0)) == A(0) && !std::signbit(fastopt::sign_of(A(-0.0))), t, " sign_of(-0) is +0, as torch's");
  CHECK(fastopt::sign_of(std::numeric_limits<A>::quiet_NaN()) == A(0) &&
            !std::signbit(fastopt::sign_of(-std::numeric_limits<A>::quiet_NaN())),
        t, " sign_of(nan) is +0, as torch's");
  CHECK(fastopt::sign_of(std::numeric_limits<A>::infinity()) == A(1) &&
            fastopt::sign_of(-std::numeric_limits<A>::infinity()) == A(-1),
        t, " sign_of(inf)");
  const auto k = fastopt::lion_constants<A>(1e-3, 0.9, 0.99, 0.1);
  CHECK(k.decay_factor == A(1.0 - 1e-4) && k.one_minus_beta1 == A(1.0 - 0.9) && k.one_minus_beta2 == A(1.0 - 0.99) &&
            k.neg_lr == A(-1e-3),
        t, " lion_constants");

  std::mt19937 rng(seed);
  const double rtol = sizeof(A) == sizeof(float) ? 1e-6 : 1e-15;
  for (double wd : {0.0, 0.1}) {
    const double lr = 1e-2, beta1 = 0.9, beta2 = 0.99;
    const auto c = fastopt::lion_constants<A>(lr, beta1, beta2, wd);
    const std::vector<A> params = random_values<A>(rng, 300), grads = random_values<A>(rng, 300),
                         moments = random_values<A>(rng, 300);
    int64_t compared = 0;
    for (size_t i = 0; i < params.size(); ++i) {
      const double m = moments[i], g = grads[i];
      const double interpolated = m + (1.0 - beta1) * (g - m);
      // Too close to 0 to know the sign in A's precision: not compared (random data: rare).
      if (std::fabs(interpolated) <= 8 * std::numeric_limits<A>::epsilon() * (std::fabs(m) + std::fabs(g))) continue;
      const double direction = interpolated > 0 ? 1.0 : -1.0;
      const double expected_param = params[i] * (1.0 - lr * wd) - lr * direction;
      const double expected_m = m + (1.0 - beta2) * (g - m);
      A p = params[i], exp_avg = moments[i];
      fastopt::lion_update<true, true>(p, grads[i], exp_avg, c);  // weights 0.1 and 0.01: from the start
      const std::string where = check::message(t, " wd ", wd, " element ", i);
      CHECK_CLOSE(p, expected_param, rtol * (std::fabs(params[i]) + lr), where, " param");
      CHECK_CLOSE(exp_avg, expected_m, rtol * (std::fabs(m) + std::fabs(g)), where, " exp_avg");
      ++compared;
    }
    CHECK(compared > 290, t, " compared ", compared, " elements");
  }
  // By hand: p = 1, m = 0, g = -3, lr = 0.25, wd = 0.5: direction -1 -> p = 1 * 0.875 + 0.25;
  // m = lerp(0, -3, 0.5) = -1.5 (beta2 = 0.5).
  A p = A(1), m = A(0);
  fastopt::lion_update<true, false>(p, A(-3), m, fastopt::lion_constants<A>(0.25, 0.9, 0.5, 0.5));
  CHECK(p == A(1.125) && m == A(-1.5), t, " hand step: p ", p, " m ", m);
  // A zero direction moves the param by its decay alone.
  A q = A(2), n = A(0);
  fastopt::lion_update<true, false>(q, A(0), n, fastopt::lion_constants<A>(0.25, 0.9, 0.5, 0.5));
  CHECK(q == A(1.75) && n == A(0), t, " zero direction: p ", q);
}
}  // namespace

int main() {
  test_norm_kind();
  test_is_finite();
  test_max_propagating_nan<float>();
  test_max_propagating_nan<double>();
  test_norm_literals<float>();
  test_norm_literals<double>();
  test_norm_random<float>(11);
  test_norm_random<double>(12);
  test_norm_nonfinite<float>(13);
  test_norm_nonfinite<double>(14);
  test_clamp_symmetric<float>(21);
  test_clamp_symmetric<double>(22);
  test_agc_coefficient<float>(31);
  test_agc_coefficient<double>(32);
  test_lerp<float>(41);
  test_lerp<double>(42);
  test_adamw_constants<float>();
  test_adamw_constants<double>();
  test_effective_grad<float>(51);
  test_effective_grad<double>(52);
  test_adamw_update<float>(61);
  test_adamw_update<double>(62);
  test_adam_l2_update<float>(71);
  test_adam_l2_update<double>(72);
  test_sgd_update<float>(81);
  test_sgd_update<double>(82);
  test_lion_update<float>(91);
  test_lion_update<double>(92);
  return check::finish("test_element_math");
}
