// The single-rank reference model against independent facts: the loss of a near-uniform
// predictor, central finite differences of the whole-model loss, the same model run in float,
// and a tied model against its untied twin.
#include "real_backend/cpu/reference.hpp"

#include "common/error.hpp"
#include "real_backend/cpu/tiny_model.hpp"
#include "tests/support/approx.hpp"
#include "workload/catalog.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <doctest/doctest.h>
#include <vector>

namespace real_backend_cpu_reference_test {

using namespace mop::real;

namespace {

using Params = std::vector<std::vector<double>>;

TinyConfig config(const char* id) {
  return tiny_config(mop::workload::load_model(id));
}

Batch small_batch(const TinyConfig& c) {
  return DataSource::synthetic(c.vocab, 7).batch(0, 2, 16);
}

// Compares d loss / d p with central differences for three elements of every parameter tensor.
// Element choice is deterministic: for the embedding, entries of rows that the batch looks up
// (the other rows of an untied embedding have a zero gradient, which would test nothing);
// elsewhere three distinct positions spread from a pseudo-random start.
//
// Step and tolerance: the loss (about 5.5) is a few hundred double roundings of 1e-16 deep, so
// it carries an error of order 1e-15 and the central difference at h = 1e-5 about
// 1e-15 / 1e-5 = 1e-10 of rounding noise; the truncation error h^2 |L'''| / 6 is smaller still
// for weights of scale 0.02 to 1. Gradient components here range from about 3e-2 down to 1e-6,
// so a component passes when it is within 1e-5 relative or 1e-9 absolute (ten times the noise
// floor; it only decides components below 1e-4).
void check_model_gradients(const TinyConfig& c, const Batch& batch, std::uint64_t seed) {
  Params params = init_params<double>(c, seed);
  Params grads;
  reference_step(c, params, batch, &grads);
  const auto layout = param_layout(c);
  REQUIRE(grads.size() == layout.size());
  const double h = 1e-5;
  for (std::size_t p = 0; p < layout.size(); ++p) {
    REQUIRE(grads[p].size() == params[p].size());
    const auto numel = static_cast<std::uint64_t>(params[p].size());
    double largest = 0;
    for (std::uint64_t j = 0; j < 3; ++j) {
      std::size_t e = (mix64(p) + j * (numel / 3 + 1)) % numel;
      if (layout[p].role == ParamRole::embedding)
        e = static_cast<std::size_t>(batch.tokens[j * 11] * c.hidden) +
            mix64(j) % static_cast<std::uint64_t>(c.hidden);
      CAPTURE(layout[p].name);
      CAPTURE(e);
      const double x0 = params[p][e];
      params[p][e] = x0 + h;
      const double up = reference_step<double>(c, params, batch, nullptr);
      params[p][e] = x0 - h;
      const double down = reference_step<double>(c, params, batch, nullptr);
      params[p][e] = x0;
      const double fd = (up - down) / (2 * h);
      const double g = grads[p][e];
      CAPTURE(fd);
      CAPTURE(g);
      CHECK((std::fabs(g - fd) <= 1e-5 * std::fabs(fd) || std::fabs(g - fd) <= 1e-9));
      largest = std::max(largest, std::fabs(fd));
    }
    // Some sampled component is well above the absolute floor, so the tensor was really tested.
    CAPTURE(layout[p].name);
    CHECK(largest > 1e-6);
  }
}

} // namespace

TEST_CASE("reference: loss at init is close to ln(vocab) for tiny-dense and tiny-moe" *
          doctest::test_suite("independent")) {
  // Weights of scale 0.02 give logits of scale about 0.2, so the prediction is nearly uniform
  // and the cross-entropy is ln(vocab) plus about half the logit variance (< 0.05).
  for (const char* id : {"tiny-dense", "tiny-moe"}) {
    CAPTURE(id);
    const TinyConfig c = config(id);
    const double loss =
        reference_step<double>(c, init_params<double>(c, 1), small_batch(c), nullptr);
    CHECK(std::fabs(loss - std::log(static_cast<double>(c.vocab))) < 0.05);
  }
}

TEST_CASE("reference: tiny-dense gradients match finite differences for every tensor" *
          doctest::test_suite("independent")) {
  const TinyConfig c = config("tiny-dense");
  check_model_gradients(c, small_batch(c), 3);
}

TEST_CASE("reference: tiny-moe gradients match finite differences for every tensor" *
          doctest::test_suite("independent")) {
  const TinyConfig c = config("tiny-moe");
  REQUIRE(c.qk_norm);
  REQUIRE(c.layers[1].moe);
  check_model_gradients(c, small_batch(c), 4);
}

TEST_CASE("reference: gradients match finite differences with a sliding window and raw top-k "
          "weights" *
          doctest::test_suite("independent")) {
  TinyConfig c = config("tiny-moe");
  c.layers[0].window = 5;
  c.layers[1].window = 3;
  c.normalize_top_k = false;
  Batch b = small_batch(c);
  b.labels[3] = -1; // an unlabelled position
  check_model_gradients(c, b, 5);
}

TEST_CASE("reference: float and double losses agree to 1e-5 relative" *
          doctest::test_suite("independent")) {
  // Float rounds each operation to 6e-8 relative; the loss sums 32 token losses of about 5.5
  // computed through sums of at most 256 terms, so its relative error stays near 1e-6.
  for (const char* id : {"tiny-dense", "tiny-moe"}) {
    CAPTURE(id);
    const TinyConfig c = config(id);
    const Batch b = small_batch(c);
    const double d = reference_step<double>(c, init_params<double>(c, 2), b, nullptr);
    std::vector<std::vector<float>> gf;
    const double f = reference_step<float>(c, init_params<float>(c, 2), b, &gf);
    CHECK(f == mop::test::rel(d, 1e-5));
  }
}

TEST_CASE("reference: a tied embedding gets the lookup and the LM-head gradient" *
          doctest::test_suite("independent")) {
  // The untied twin with lm_head = embedding^T computes the same loss; the tied embedding's
  // gradient is the twin's embedding gradient plus the transpose of its LM-head gradient.
  const TinyConfig tied = config("tiny-dense");
  REQUIRE(tied.tied_embeddings);
  TinyConfig untied = tied;
  untied.tied_embeddings = false;
  const Batch b = small_batch(tied);
  const Params pt = init_params<double>(tied, 6);
  Params pu = pt;
  const int H = tied.hidden, V = tied.vocab;
  std::vector<double> head(static_cast<std::size_t>(H) * V);
  for (int v = 0; v < V; ++v)
    for (int j = 0; j < H; ++j)
      head[j * V + v] = pt[0][v * H + j];
  pu.push_back(head);
  REQUIRE(param_layout(untied).back().role == ParamRole::lm_head);

  Params gt, gu;
  const double lt = reference_step(tied, pt, b, &gt);
  const double lu = reference_step(untied, pu, b, &gu);
  CHECK(lt == mop::test::rel(lu, 1e-14));
  REQUIRE(gu.size() == gt.size() + 1);
  double worst = 0, scale = 0;
  for (int v = 0; v < V; ++v)
    for (int j = 0; j < H; ++j) {
      const double sum = gu[0][v * H + j] + gu.back()[j * V + v];
      worst = std::max(worst, std::fabs(gt[0][v * H + j] - sum));
      scale = std::max(scale, std::fabs(sum));
    }
  CHECK(scale > 0);
  CHECK(worst <= 1e-12 * scale);
  // The LM-head part is not zero, so the check above is not just the lookup gradient.
  double head_scale = 0;
  for (double g : gu.back())
    head_scale = std::max(head_scale, std::fabs(g));
  CHECK(head_scale > 1e-3 * scale);
}

TEST_CASE("reference: mismatched parameters and batches are input errors" *
          doctest::test_suite("plumbing")) {
  const TinyConfig c = config("tiny-dense");
  const Params p = init_params<double>(c, 1);
  const Batch b = small_batch(c);
  Params fewer = p;
  fewer.pop_back();
  CHECK_THROWS_AS(reference_step<double>(c, fewer, b, nullptr), mop::InputError);
  Params shorter = p;
  shorter[1].pop_back();
  CHECK_THROWS_AS(reference_step<double>(c, shorter, b, nullptr), mop::InputError);
  Batch bad = b;
  bad.tokens[5] = c.vocab;
  CHECK_THROWS_AS(reference_step<double>(c, p, bad, nullptr), mop::InputError);
  bad = b;
  bad.labels.pop_back();
  CHECK_THROWS_AS(reference_step<double>(c, p, bad, nullptr), mop::InputError);
  bad = b;
  bad.seq_len = 15;
  CHECK_THROWS_AS(reference_step<double>(c, p, bad, nullptr), mop::InputError);
}

} // namespace real_backend_cpu_reference_test
