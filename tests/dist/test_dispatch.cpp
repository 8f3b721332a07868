// Expert-parallel dispatch over the ranks of the test communicator (EP = its size, 1, 2 or 4):
// hand-written routings with explicit expected rows, combines and gradients (uneven splits, an
// expert with zero tokens, a rank that sends nothing, one expert per rank, K = E); the weight
// gather and its reduce-scatter backward.
// Data: feature c of token t on rank s is s * 1000 + t * 10 + c; routing weights and the test
// "experts" (row * (g + 1) for global expert g) are integers, so every sum is exact.
#include <ATen/ATen.h>

#include "kernels/permute.h"
#include "parallel/expert_dispatcher.h"
#include "tests/dist/dist_test_util.h"

namespace mole::dist::test {
namespace {

constexpr int64_t kD = 2;

struct Pair {
  int64_t token;
  int64_t expert;
  double weight;
};

// A routing known to every rank as a closed form of (rank, P): what rank s routes, token-major.
struct Case {
  const char* name;
  int64_t experts_per_rank;
  std::function<int64_t(int rank, int P)> tokens;
  std::function<std::vector<Pair>(int rank, int P)> pairs;
};

double feature(int rank, int64_t token, int64_t c) { return rank * 1000 + token * 10 + c; }

at::Tensor tokens_of(int rank, int64_t T) {
  return make_tensor({T, kD}, at::kDouble,
                     [&](int64_t k) { return feature(rank, k / kD, k % kD); });
}

std::vector<Case> cases() {
  return {
      {"uneven splits", 2, [](int r, int) { return 2 + r; },
       [](int r, int P) {
         const int64_t E = 2 * P;
         std::vector<Pair> out;
         for (int64_t t = 0; t < 2 + r; ++t) {
           const int64_t a = (t + r) % E, b = (3 * t + 1) % E;
           out.push_back({t, a, 1});
           if (t % 2 == 0 && b != a) out.push_back({t, b, 2});
         }
         return out;
       }},
      {"an expert with zero tokens", 2, [](int, int) { return 5; },
       [](int r, int P) {
         const int64_t E = 2 * P;  // expert E - 1 gets nothing
         std::vector<Pair> out;
         for (int64_t t = 0; t < 5; ++t) out.push_back({t, (t + r) % (E - 1), 1});
         return out;
       }},
      {"a rank that sends nothing", 1, [](int r, int) { return r == 0 ? 0 : 3; },
       [](int r, int P) {
         std::vector<Pair> out;
         if (r == 0) return out;
         for (int64_t t = 0; t < 3; ++t) out.push_back({t, (t * r) % P, 1});
         return out;
       }},
      {"one expert per rank", 1, [](int, int) { return 4; },
       [](int r, int P) {
         std::vector<Pair> out;
         for (int64_t t = 0; t < 4; ++t) out.push_back({t, (t + r) % P, 1});
         return out;
       }},
      {"K = E", 2, [](int, int) { return 3; },
       [](int, int P) {
         std::vector<Pair> out;
         for (int64_t t = 0; t < 3; ++t) {
           for (int64_t g = 0; g < 2 * P; ++g) out.push_back({t, g, static_cast<double>(g % 3 + 1)});
         }
         return out;
       }},
  };
}

kernels::PermutePlan plan_of(const std::vector<Pair>& pairs, int64_t T, int64_t E) {
  std::vector<int64_t> token, expert;
  for (const Pair& p : pairs) {
    token.push_back(p.token);
    expert.push_back(p.expert);
  }
  return kernels::make_permute_plan(at::tensor(token, at::kLong), at::tensor(expert, at::kLong), T, E);
}

at::Tensor weights_of(const std::vector<Pair>& pairs) {
  std::vector<double> w;
  for (const Pair& p : pairs) w.push_back(p.weight);
  return at::tensor(w, at::kDouble);
}

class Dispatch : public BackendTest {};

TEST_P(Dispatch, HandWrittenRoutingsGiveTheExpectedRowsCombineAndGradient) {
  const int P = comm().size(), r = comm().rank();
  parallel::ExpertParallelDispatcher dispatcher(comm(), {});
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const int64_t e = c.experts_per_rank, E = e * P, T = c.tokens(r, P);
    const moe::ExpertShard shard = dispatcher.shard(E);
    ASSERT_EQ(shard.first, r * e);
    ASSERT_EQ(shard.count, e);
    const std::vector<Pair> pairs = c.pairs(r, P);
    at::Tensor x = tokens_of(r, T).requires_grad_(true);
    moe::Dispatched in = dispatcher.dispatch(x, plan_of(pairs, T, E));

    // Rows of local expert j: from every source rank in rank order, each source's pairs of that
    // expert in its routing order.
    std::vector<double> expected_rows;
    std::vector<int64_t> expected_counts(static_cast<size_t>(e), 0);
    for (int64_t j = 0; j < e; ++j) {
      for (int src = 0; src < P; ++src) {
        for (const Pair& p : c.pairs(src, P)) {
          if (p.expert != r * e + j) continue;
          ++expected_counts[static_cast<size_t>(j)];
          for (int64_t k = 0; k < kD; ++k) expected_rows.push_back(feature(src, p.token, k));
        }
      }
    }
    EXPECT_EQ(in.counts(), expected_counts);
    EXPECT_EQ(values(in.rows_RD), expected_rows);

    // Expert g multiplies its rows by g + 1.
    std::vector<at::Tensor> segments;
    int64_t begin = 0;
    for (int64_t j = 0; j < e; ++j) {
      const int64_t n = in.counts()[static_cast<size_t>(j)];
      segments.push_back(in.rows_RD.narrow(0, begin, n) * static_cast<double>(r * e + j + 1));
      begin += n;
    }
    at::Tensor y = dispatcher.combine(at::cat(segments), *in.handle, weights_of(pairs));
    std::vector<double> expected_y(static_cast<size_t>(T * kD), 0.0), expected_grad(expected_y.size(), 0.0);
    for (const Pair& p : pairs) {
      for (int64_t k = 0; k < kD; ++k) {
        expected_y[static_cast<size_t>(p.token * kD + k)] += p.weight * (p.expert + 1) * feature(r, p.token, k);
        expected_grad[static_cast<size_t>(p.token * kD + k)] += p.weight * (p.expert + 1);
      }
    }
    EXPECT_EQ(values(y), expected_y);
    // The backward runs the reverse exchanges on every rank, also those with nothing to send.
    y.sum().backward();
    EXPECT_EQ(values(x.grad()), expected_grad);
  }
}

TEST_P(Dispatch, WeightGatherAndItsReduceScatter) {
  const int P = comm().size(), r = comm().rank();
  parallel::ExpertParallelDispatcher dispatcher(comm(), {});
  const int64_t e = 2, E = e * P;
  // Local stacks hold their global expert ids: a [e, 2, 3] with g * 100 + k, b [e, 3].
  at::Tensor a = make_tensor({e, 2, 3}, at::kFloat, [&](int64_t k) { return (r * e + k / 6) * 100 + k % 6; })
                     .requires_grad_(true);
  at::Tensor b = make_tensor({e, 3}, at::kFloat, [&](int64_t k) { return -(r * e + k / 3); })
                     .requires_grad_(true);
  std::vector<at::Tensor> full = dispatcher.gather_experts({a, b}, E);
  ASSERT_EQ(full.size(), 2u);
  EXPECT_EQ(full[0].sizes(), (std::vector<int64_t>{E, 2, 3}));
  EXPECT_EQ(values(full[0]), values(make_tensor({E, 2, 3}, at::kFloat, [](int64_t k) { return (k / 6) * 100 + k % 6; })));
  EXPECT_EQ(values(full[1]), values(make_tensor({E, 3}, at::kFloat, [](int64_t k) { return -(k / 3); })));
  // Rank s weighs every gathered element by s + 1: each owner's gradient is the sum over ranks.
  ((full[0].sum() + full[1].sum()) * static_cast<double>(r + 1)).backward();
  const double sum = P * (P + 1) / 2.0;
  EXPECT_EQ(values(a.grad()), std::vector<double>(static_cast<size_t>(a.numel()), sum));
  EXPECT_EQ(values(b.grad()), std::vector<double>(static_cast<size_t>(b.numel()), sum));
  const int64_t sent = dispatcher.traffic().bytes_sent.load();
  EXPECT_EQ(sent, 2 * (P - 1) * (a.numel() + b.numel()) * 4) << "gather and reduce-scatter bytes";
  if (P > 1) {
    EXPECT_ERROR_CONTAINS(dispatcher.gather_experts({a.narrow(0, 0, 1)}, E),
                          "expected stacks of 2 experts");
  }
}

TEST_P(Dispatch, PlacementReplicatesSitesWithFewerExpertsThanRanks) {
  const int P = comm().size(), r = comm().rank();
  parallel::ExpertParallelDispatcher dispatcher(comm(), {});
  const moe::ExpertShard split = dispatcher.shard(4 * P);
  EXPECT_EQ(split.first, 4 * r);
  EXPECT_EQ(split.count, 4);
  if (P > 1) {
    EXPECT_TRUE(dispatcher.shard(P - 1).is_full());
    EXPECT_ERROR_CONTAINS(dispatcher.shard(P + 1), "cannot be split over parallel.ep");
  }
  EXPECT_ERROR_CONTAINS(dispatcher.mode("layers.0.mlp"), "no dispatch mode was chosen");
}

MOLE_FOR_EACH_BACKEND(Dispatch);

}  // namespace
}  // namespace mole::dist::test
