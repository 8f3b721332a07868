// The data pipeline after the tokenizer (tokenizers: test_tokenizer.cpp): JSONL formats and their
// loss masks, truncation, input errors with file:line and field, collation, the sharded and
// resumable loader, and the synthetic multi-task data.
#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <memory>
#include <set>

#include "launch/data.h"
#include "tests/data_test_util.h"
#include "tests/test_util.h"

namespace mole::launch {
namespace {

using data_test::cat;
using data_test::error_of;
using data_test::expect_all;
using data_test::ignored;
using data_test::JsonlFile;
using data_test::kIgnore;

std::vector<int64_t> row(const at::Tensor& t_BS, int64_t b) {
  at::Tensor r = t_BS[b].contiguous();
  return {r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + r.numel()};
}

// ---------------------------------------------------------------- formats and masks

TEST(DataAlpaca, LabelsIgnoreExactlyBosAndPrompt) {
  auto tok = make_tokenizer("byte");
  JsonlFile f({R"({"instruction": "Reverse it.", "input": "abc", "output": "cba"})",
               R"({"instruction": "Say hi.", "output": "hi"})",
               R"({"instruction": "Say yo.", "input": null, "output": "yo"})"});
  DatasetStats stats;
  std::vector<Example> ex = f.load(*tok, "alpaca", 512, &stats);
  ASSERT_EQ(ex.size(), 3u);
  EXPECT_EQ(stats.examples, 3);
  EXPECT_EQ(stats.truncated, 0);
  EXPECT_EQ(stats.dropped, 0);
  const std::string prompts[] = {
      "### Instruction:\nReverse it.\n\n### Input:\nabc\n\n### Response:\n",
      "### Instruction:\nSay hi.\n\n### Response:\n",
      "### Instruction:\nSay yo.\n\n### Response:\n"};
  const std::string outputs[] = {"cba", "hi", "yo"};
  for (int i = 0; i < 3; ++i) {
    std::vector<int64_t> p = tok->encode(prompts[i]), r = tok->encode(outputs[i]);
    EXPECT_EQ(ex[i].input_ids, cat({{1}, p, r, {2}})) << i;
    EXPECT_EQ(ex[i].labels, cat({ignored(1 + p.size()), r, {2}})) << i;
  }
}

TEST(DataPromptResponse, LabelsIgnorePrompt) {
  auto tok = make_tokenizer("byte");
  JsonlFile f({"", R"({"prompt": "Q: 2+2?\n", "response": "4"})", "  "});
  std::vector<Example> ex = f.load(*tok, "prompt_response");
  ASSERT_EQ(ex.size(), 1u);
  std::vector<int64_t> p = tok->encode("Q: 2+2?\n");
  EXPECT_EQ(ex[0].input_ids, cat({{1}, p, {3 + '4', 2}}));
  EXPECT_EQ(ex[0].labels, cat({ignored(1 + p.size()), {3 + '4', 2}}));
}

TEST(DataTokens, LabelsDefaultToInputIds) {
  auto tok = make_tokenizer("byte");
  JsonlFile f({R"({"input_ids": [1, 10, 11, 12, 2]})",
               R"({"input_ids": [1, 20, 21], "labels": [-100, -100, 21]})"});
  std::vector<Example> ex = f.load(*tok, "tokens");
  ASSERT_EQ(ex.size(), 2u);
  EXPECT_EQ(ex[0].input_ids, (std::vector<int64_t>{1, 10, 11, 12, 2}));  // no bos/eos added
  EXPECT_EQ(ex[0].labels, ex[0].input_ids);
  EXPECT_EQ(ex[1].input_ids, (std::vector<int64_t>{1, 20, 21}));
  EXPECT_EQ(ex[1].labels, (std::vector<int64_t>{kIgnore, kIgnore, 21}));
}

TEST(DataTruncation, CountsTruncatedAndDropped) {
  auto tok = make_tokenizer("byte");
  // seq_len 6. bos+prompt of 5 leaves one response token: truncated. bos+prompt of 6: dropped.
  JsonlFile f({R"({"prompt": "abcd", "response": "xy"})",
               R"({"prompt": "abcde", "response": "xy"})", R"({"prompt": "a", "response": "b"})"});
  DatasetStats stats;
  std::vector<Example> ex = f.load(*tok, "prompt_response", 6, &stats);
  ASSERT_EQ(ex.size(), 2u);
  EXPECT_EQ(stats.examples, 2);
  EXPECT_EQ(stats.truncated, 1);
  EXPECT_EQ(stats.dropped, 1);
  EXPECT_EQ(ex[0].input_ids, cat({{1}, tok->encode("abcdx")}));
  EXPECT_EQ(ex[0].labels, cat({ignored(5), {3 + 'x'}}));
  EXPECT_EQ(ex[1].input_ids, cat({{1}, tok->encode("ab"), {2}}));

  // Every example loses its targets: an error, not an empty dataset.
  JsonlFile tokens({R"({"input_ids": [5]})",
                    R"({"input_ids": [5, 6, 7], "labels": [5, -100, -100]})",
                    R"({"input_ids": [5, 6, 7, 8], "labels": [-100, -100, -100, 8]})"});
  expect_all(tokens.error("tokens", 3), {tokens.path, "no usable example", "all 3"});
}

// ---------------------------------------------------------------- input errors

TEST(DataErrors, BadJsonNamesTheLine) {
  JsonlFile f({R"({"instruction": "a", "output": "b"})", "", R"({"instruction": "a", )"});
  expect_all(f.error("alpaca"), {f.path + ":3: not valid JSON (column "});
  JsonlFile array({"[1, 2]"});
  expect_all(array.error("alpaca"), {array.path + ":1: expected a JSON object, got array"});
}

TEST(DataErrors, MissingFieldNamesFieldAndFormat) {
  JsonlFile f({R"({"instruction": "a", "output": "b"})", R"({"instruction": "a"})"});
  expect_all(f.error("alpaca"), {f.path + ":2: missing field 'output' (format alpaca)"});
  JsonlFile pr({R"({"response": "b"})"});
  expect_all(pr.error("prompt_response"),
             {pr.path + ":1: missing field 'prompt' (format prompt_response)"});
  JsonlFile tokens({R"({"labels": [1, 2]})"});
  expect_all(tokens.error("tokens"),
             {tokens.path + ":1: missing field 'input_ids' (format tokens)"});
}

TEST(DataErrors, WrongTypesAreNamed) {
  JsonlFile f({R"({"instruction": 5, "output": "b"})"});
  expect_all(f.error("alpaca"), {f.path + ":1: field 'instruction' must be a string, got 5"});
  JsonlFile input({R"({"instruction": "a", "input": ["x"], "output": "b"})"});
  expect_all(input.error("alpaca"), {input.path + ":1: field 'input' must be a string"});
  JsonlFile ids({R"({"input_ids": "1 2 3"})"});
  expect_all(ids.error("tokens"), {ids.path + ":1: field 'input_ids' must be an array"});
  JsonlFile element({R"({"input_ids": [1, 2.5]})"});
  expect_all(element.error("tokens"),
             {element.path + ":1: field 'input_ids'[1] must be an integer, got 2.5"});
}

TEST(DataErrors, TokenIdsOutsideTheVocabulary) {
  JsonlFile f({R"({"input_ids": [1, 2, 3]})", R"({"input_ids": [1, 2, 259]})"});
  expect_all(f.error("tokens"),
             {f.path + ":2: field 'input_ids'[2] = 259 is outside the vocabulary [0, 259)"});
  JsonlFile negative({R"({"input_ids": [1, -100]})"});  // -100 only allowed in labels
  expect_all(negative.error("tokens"), {negative.path + ":1: field 'input_ids'[1] = -100"});
  JsonlFile labels({R"({"input_ids": [1, 2], "labels": [-100, -1]})"});
  expect_all(labels.error("tokens"), {labels.path + ":1: field 'labels'[1] = -1"});
  JsonlFile length({R"({"input_ids": [1, 2], "labels": [-100]})"});
  expect_all(length.error("tokens"),
             {length.path + ":1: field 'labels' has 1 entries but 'input_ids' has 2"});
}

TEST(DataErrors, EmptyBlankAndMissingFiles) {
  JsonlFile empty({});
  expect_all(empty.error("alpaca"), {empty.path, "no examples"});
  JsonlFile blank({"", "   ", "\t\r"});
  expect_all(blank.error("alpaca"), {blank.path, "no examples"});
  test::TempDir dir;
  auto tok = make_tokenizer("byte");
  DataOptions o;
  o.path = dir.file("missing.jsonl");
  expect_all(error_of([&] { load_dataset(o, *tok); }),
             {o.path, "cannot be opened: No such file or directory"});
  o.path = dir.path();
  expect_all(error_of([&] { load_dataset(o, *tok); }), {"data file '" + dir.path() + "' is a directory"});
}

TEST(DataErrors, BadOptions) {
  JsonlFile f({R"({"instruction": "a", "output": "b"})"});
  expect_all(f.error("alpaca", 1), {"data.seq_len must be at least 2, got 1"});
  expect_all(f.error("sharegpt"), {"data.format 'sharegpt'"});
  auto tok = make_tokenizer("byte");
  DataOptions o;
  o.path = "synthetic:nope";
  expect_all(error_of([&] { load_dataset(o, *tok); }), {"synthetic:nope", "synthetic:multitask"});
}

TEST(DataSynthetic, LoadsPromptResponsePairs) {
  auto tok = make_tokenizer("byte");
  DataOptions o;
  o.path = "synthetic:multitask";
  o.synthetic_examples = 30;
  o.seed = 7;
  std::vector<Example> ex = load_dataset(o, *tok);
  auto pairs = synthetic_multitask(30, 7);
  ASSERT_EQ(ex.size(), 30u);
  for (size_t i = 0; i < ex.size(); ++i) {
    std::vector<int64_t> p = tok->encode(pairs[i].first), r = tok->encode(pairs[i].second);
    EXPECT_EQ(ex[i].input_ids, cat({{1}, p, r, {2}})) << i;
    EXPECT_EQ(ex[i].labels, cat({ignored(1 + p.size()), r, {2}})) << i;
  }
}

// ---------------------------------------------------------------- collate

TEST(DataCollate, RightPadsAndCountsShiftedTargets) {
  Example a{{1, 5, 6, 7, 2}, {kIgnore, kIgnore, 6, 7, 2}};  // 3 targets
  Example b{{1, 8, 2}, {kIgnore, 8, 2}};                    // 2 targets
  Example c{{9, 10}, {9, 10}};  // the label at position 0 has nothing before it: 1 target
  MicroBatch mb = collate({&a, &b, &c}, 0);
  ASSERT_EQ(mb.input_ids_BS.sizes(), (std::vector<int64_t>{3, 5}));
  EXPECT_EQ(mb.input_ids_BS.scalar_type(), at::kLong);
  EXPECT_EQ(mb.labels_BS.scalar_type(), at::kLong);
  EXPECT_EQ(mb.valid_BS.scalar_type(), at::kBool);
  EXPECT_EQ(row(mb.input_ids_BS, 0), (std::vector<int64_t>{1, 5, 6, 7, 2}));
  EXPECT_EQ(row(mb.input_ids_BS, 1), (std::vector<int64_t>{1, 8, 2, 0, 0}));
  EXPECT_EQ(row(mb.input_ids_BS, 2), (std::vector<int64_t>{9, 10, 0, 0, 0}));
  EXPECT_EQ(row(mb.labels_BS, 1), (std::vector<int64_t>{kIgnore, 8, 2, kIgnore, kIgnore}));
  EXPECT_EQ(row(mb.labels_BS, 2), (std::vector<int64_t>{9, 10, kIgnore, kIgnore, kIgnore}));
  EXPECT_EQ(row(mb.valid_BS.to(at::kLong), 0), (std::vector<int64_t>{1, 1, 1, 1, 1}));
  EXPECT_EQ(row(mb.valid_BS.to(at::kLong), 1), (std::vector<int64_t>{1, 1, 1, 0, 0}));
  EXPECT_EQ(row(mb.valid_BS.to(at::kLong), 2), (std::vector<int64_t>{1, 1, 0, 0, 0}));
  EXPECT_EQ(mb.num_target_tokens, 6);
  MicroBatch padded = collate({&b}, 7);  // the longest example sets S
  EXPECT_EQ(row(padded.input_ids_BS, 0), (std::vector<int64_t>{1, 8, 2}));
  MicroBatch other_pad = collate({&c, &b}, 7);
  EXPECT_EQ(row(other_pad.input_ids_BS, 0), (std::vector<int64_t>{9, 10, 7}));
}

// ---------------------------------------------------------------- loader

// Example i starts with token 1000 + i and has 2 + i % 3 tokens, all of them labels.
std::vector<Example> numbered(int64_t n) {
  std::vector<Example> out;
  for (int64_t i = 0; i < n; ++i) {
    Example e;
    for (int64_t k = 0; k < 2 + i % 3; ++k) e.input_ids.push_back(1000 + i + k * 10000);
    e.labels = e.input_ids;
    out.push_back(e);
  }
  return out;
}

// The example indices of a micro-batch, from their first tokens.
std::vector<int64_t> indices(const MicroBatch& mb) {
  std::vector<int64_t> out;
  for (int64_t b = 0; b < mb.input_ids_BS.size(0); ++b)
    out.push_back(row(mb.input_ids_BS, b)[0] - 1000);
  return out;
}

// One step of all ranks: the global batch as laid out by the micro-batch formula.
struct GlobalStep {
  std::vector<int64_t> order;     // example index at each global-batch position
  int64_t target_tokens_sum = 0;  // sum of num_target_tokens over all ranks' micro-batches
  int64_t global_target_tokens = -1;
  int64_t epoch = -1;
};

std::vector<GlobalStep> run_all_ranks(int64_t n, int64_t micro, int64_t global, int64_t world,
                                      int64_t steps, uint64_t seed) {
  std::vector<DataLoader> loaders;
  for (int64_t r = 0; r < world; ++r)
    loaders.emplace_back(numbered(n), micro, global, r, world, seed, 0);
  std::vector<GlobalStep> out(steps);
  for (int64_t s = 0; s < steps; ++s) {
    out[s].order.assign(global, -1);
    for (int64_t r = 0; r < world; ++r) {
      StepBatch step = loaders[r].next();
      EXPECT_EQ(static_cast<int64_t>(step.micro_batches.size()), global / (micro * world));
      if (r == 0) {
        out[s].global_target_tokens = step.global_target_tokens;
        out[s].epoch = step.epoch;
      }
      EXPECT_EQ(step.global_target_tokens, out[s].global_target_tokens) << "rank " << r;
      EXPECT_EQ(step.epoch, out[s].epoch) << "rank " << r;
      for (size_t j = 0; j < step.micro_batches.size(); ++j) {
        std::vector<int64_t> idx = indices(step.micro_batches[j]);
        EXPECT_EQ(static_cast<int64_t>(idx.size()), micro);
        for (int64_t k = 0; k < micro; ++k) {
          const int64_t pos = (static_cast<int64_t>(j) * world + r) * micro + k;
          EXPECT_EQ(out[s].order[pos], -1) << "position " << pos << " filled twice";
          out[s].order[pos] = idx[k];
        }
        out[s].target_tokens_sum += step.micro_batches[j].num_target_tokens;
      }
    }
  }
  return out;
}

TEST(LoaderSharding, SameGlobalBatchesForWorld124AndEveryExampleOncePerEpoch) {
  const int64_t n = 48, global = 16, steps = 6;  // 3 steps per epoch, 2 epochs
  std::vector<GlobalStep> ref = run_all_ranks(n, 2, global, 1, steps, 5);
  for (int64_t world : {2, 4}) {
    std::vector<GlobalStep> got = run_all_ranks(n, 2, global, world, steps, 5);
    for (int64_t s = 0; s < steps; ++s) {
      EXPECT_EQ(got[s].order, ref[s].order) << "world " << world << " step " << s;
      EXPECT_EQ(got[s].global_target_tokens, ref[s].global_target_tokens);
    }
  }
  // Micro-batch 4 on 2 ranks lays out the same global batches too.
  std::vector<GlobalStep> wide = run_all_ranks(n, 4, global, 2, steps, 5);
  for (int64_t s = 0; s < steps; ++s) EXPECT_EQ(wide[s].order, ref[s].order);
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    std::multiset<int64_t> used;
    for (int64_t s = epoch * 3; s < epoch * 3 + 3; ++s) {
      EXPECT_EQ(ref[s].epoch, epoch);
      EXPECT_EQ(ref[s].target_tokens_sum, ref[s].global_target_tokens);
      used.insert(ref[s].order.begin(), ref[s].order.end());
    }
    ASSERT_EQ(used.size(), 48u);
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(used.count(i), 1u) << "example " << i;
  }
  EXPECT_NE(ref[0].order, ref[3].order);  // a new shuffle per epoch
}

// The unpadded token sequences of a step's micro-batches.
std::multiset<std::vector<int64_t>> sequences(const StepBatch& step) {
  std::multiset<std::vector<int64_t>> out;
  for (const MicroBatch& mb : step.micro_batches) {
    for (int64_t b = 0; b < mb.input_ids_BS.size(0); ++b) {
      std::vector<int64_t> ids = row(mb.input_ids_BS, b);
      ids.resize(mb.valid_BS[b].sum().item<int64_t>());
      out.insert(ids);
    }
  }
  return out;
}

TEST(LoaderSharding, RankShardsAreDisjointTokenSequences) {
  // 24 examples = 3 global batches, so no batch straddles an epoch and repeats an example.
  DataLoader r0(numbered(24), 2, 8, 0, 2, 3, 0), r1(numbered(24), 2, 8, 1, 2, 3, 0);
  DataLoader whole(numbered(24), 4, 8, 0, 1, 3, 0);
  for (int step = 0; step < 5; ++step) {
    const StepBatch a = r0.next(), b = r1.next(), w = whole.next();
    std::multiset<std::vector<int64_t>> shard0 = sequences(a), shard1 = sequences(b);
    for (const auto& seq : shard0) EXPECT_EQ(shard1.count(seq), 0u) << "step " << step;
    shard0.insert(shard1.begin(), shard1.end());
    EXPECT_EQ(shard0, sequences(w)) << "step " << step;
    int64_t targets = 0;
    for (const StepBatch* s : {&a, &b}) {
      for (const MicroBatch& mb : s->micro_batches) targets += mb.num_target_tokens;
    }
    EXPECT_EQ(targets, w.global_target_tokens);
    EXPECT_EQ(a.global_target_tokens, w.global_target_tokens);
  }
}

TEST(LoaderSharding, GlobalBatchSpansTheEpochBoundary) {
  std::vector<GlobalStep> steps = run_all_ranks(10, 2, 4, 2, 5, 11);  // 20 examples, 2 epochs
  std::vector<int64_t> flat;
  for (const GlobalStep& s : steps) flat.insert(flat.end(), s.order.begin(), s.order.end());
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::set<int64_t> seen(flat.begin() + epoch * 10, flat.begin() + epoch * 10 + 10);
    EXPECT_EQ(seen.size(), 10u) << "epoch " << epoch;
  }
  EXPECT_EQ(steps[2].epoch, 0);  // positions 8, 9 of epoch 0 and 0, 1 of epoch 1
  EXPECT_EQ(steps[3].epoch, 1);
  for (const GlobalStep& s : steps) EXPECT_EQ(s.target_tokens_sum, s.global_target_tokens);
}

TEST(LoaderDeterminism, SeedFixesTheOrder) {
  auto first = run_all_ranks(30, 2, 6, 1, 5, 42), again = run_all_ranks(30, 2, 6, 1, 5, 42);
  auto other = run_all_ranks(30, 2, 6, 1, 5, 43);
  bool differs = false;
  for (size_t s = 0; s < first.size(); ++s) {
    EXPECT_EQ(first[s].order, again[s].order);
    differs |= first[s].order != other[s].order;
  }
  EXPECT_TRUE(differs);
}

TEST(LoaderResume, RestoredCursorReplaysTheSameBatches) {
  DataLoader a(numbered(10), 2, 4, 1, 2, 9, 0);
  for (int s = 0; s < 3; ++s) a.next();
  const LoaderCursor saved = a.cursor();
  EXPECT_EQ(saved.epoch, 1);  // 12 examples consumed lazily: (epoch 1, position 2)
  EXPECT_EQ(saved.position, 2);
  std::vector<StepBatch> expected;
  for (int s = 0; s < 6; ++s) expected.push_back(a.next());

  DataLoader b(numbered(10), 2, 4, 1, 2, 9, 0);
  b.restore(saved);
  for (int s = 0; s < 6; ++s) {
    StepBatch got = b.next();
    EXPECT_EQ(got.epoch, expected[s].epoch);
    EXPECT_EQ(got.global_target_tokens, expected[s].global_target_tokens);
    ASSERT_EQ(got.micro_batches.size(), expected[s].micro_batches.size());
    for (size_t j = 0; j < got.micro_batches.size(); ++j) {
      EXPECT_TRUE(
          got.micro_batches[j].input_ids_BS.equal(expected[s].micro_batches[j].input_ids_BS));
      EXPECT_TRUE(got.micro_batches[j].labels_BS.equal(expected[s].micro_batches[j].labels_BS));
    }
  }
  EXPECT_EQ(b.cursor().epoch, a.cursor().epoch);
  EXPECT_EQ(b.cursor().position, a.cursor().position);

  DataLoader end_of_epoch(numbered(10), 2, 4, 1, 2, 9, 0);
  end_of_epoch.restore({0, 10});  // the whole epoch consumed: the next batch opens epoch 1
  EXPECT_EQ(end_of_epoch.next().epoch, 1);
  expect_all(error_of([&] { b.restore({0, 11}); }), {"position 11", "10 examples"});
  expect_all(error_of([&] { b.restore({-1, 0}); }), {"epoch -1"});
}

TEST(LoaderErrors, GlobalBatchMustDivide) {
  expect_all(error_of([] { DataLoader(numbered(64), 8, 32, 0, 3, 0, 0); }),
             {"train.global_batch (32) must be a multiple of micro_batch (8) x world size (3)"});
  expect_all(error_of([] { DataLoader(numbered(4), 2, 4, 2, 2, 0, 0); }), {"rank 2"});
  expect_all(error_of([] { DataLoader({}, 2, 4, 0, 1, 0, 0); }), {"empty"});
  DataLoader ok(numbered(4), 2, 8, 1, 2, 0, 0);
  EXPECT_EQ(ok.accumulation_steps(), 2);
  EXPECT_EQ(ok.size(), 4);
}

// ---------------------------------------------------------------- synthetic data

// The expected response, computed independently of the generator.
std::string expected_response(const std::string& task, const std::string& in) {
  std::string out;
  if (task == "reverse") {
    for (size_t i = in.size(); i > 0; --i) out += in[i - 1];
  } else if (task == "upper") {
    for (char c : in) out += static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  } else if (task == "sort") {
    int counts[26] = {};
    for (char c : in) ++counts[c - 'a'];
    for (int l = 0; l < 26; ++l) out += std::string(counts[l], static_cast<char>('a' + l));
  } else if (task == "repeat") {
    out = in + in;
  } else if (task == "caesar") {
    for (char c : in) out += c == 'z' ? 'a' : static_cast<char>(c + 1);
  } else if (task == "count") {
    int counts[26] = {};
    for (char c : in) ++counts[c - 'a'];
    for (int l = 0; l < 26; ++l) {
      if (counts[l] > 0) out += std::to_string(counts[l]) + static_cast<char>('a' + l);
    }
  } else {
    ADD_FAILURE() << "unknown task '" << task << "'";
  }
  return out;
}

TEST(SyntheticMultitask, DeterministicPerSeed) {
  EXPECT_EQ(synthetic_multitask(50, 1), synthetic_multitask(50, 1));
  EXPECT_NE(synthetic_multitask(50, 1), synthetic_multitask(50, 2));
  auto longer = synthetic_multitask(80, 1), shorter = synthetic_multitask(50, 1);
  EXPECT_TRUE(std::equal(shorter.begin(), shorter.end(), longer.begin()));  // a prefix
  expect_all(error_of([] { synthetic_multitask(0, 1); }), {"got 0"});
}

TEST(SyntheticMultitask, AllTasksPresentAndResponsesCorrect) {
  std::map<std::string, int> per_task;
  std::set<size_t> lengths;
  for (const auto& [prompt, response] : synthetic_multitask(600, 123)) {
    const size_t colon = prompt.find(": ");
    ASSERT_NE(colon, std::string::npos) << prompt;
    ASSERT_EQ(prompt.back(), '\n') << prompt;
    const std::string task = prompt.substr(0, colon);
    const std::string input = prompt.substr(colon + 2, prompt.size() - colon - 3);
    ASSERT_GE(input.size(), 3u) << prompt;
    ASSERT_LE(input.size(), 8u) << prompt;
    for (char c : input) ASSERT_TRUE(c >= 'a' && c <= 'h') << prompt;
    EXPECT_EQ(response, expected_response(task, input)) << prompt;
    ++per_task[task];
    lengths.insert(input.size());
  }
  EXPECT_EQ(per_task.size(), 6u);
  for (const auto& [task, n] : per_task) EXPECT_EQ(n, 100) << task;
  EXPECT_EQ(lengths.size(), 6u);  // every length 3..8 occurs
}

}  // namespace
}  // namespace mole::launch
