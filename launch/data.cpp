// Dataset loading (JSONL formats and the synthetic data), micro-batch collation and the
// deterministic, resumable, rank-sharded DataLoader (see data.h).
#include "launch/data.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>
#include <system_error>
#include <thread>

#include "kernels/check.h"
#include "launch/chat.h"

namespace mole::launch {
namespace {

using nlohmann::json;

constexpr int64_t kIgnore = -100;
constexpr const char* kSyntheticPrefix = "synthetic:";

// Labels that count toward the loss: positions 1..S-1, each predicted from the token before it.
int64_t count_targets(const Example& example) {
  int64_t n = 0;
  for (size_t i = 1; i < example.labels.size(); ++i) n += example.labels[i] != kIgnore;
  return n;
}

// Uniform in [0, n) from the raw engine output (distributions differ across standard libraries).
uint64_t below(std::mt19937_64& rng, uint64_t n) {
  const uint64_t threshold = (0 - n) % n;  // 2^64 mod n: reject these to avoid modulo bias
  uint64_t r = rng();
  while (r < threshold) r = rng();
  return r % n;
}

// A JSON value for an error message, shortened.
std::string brief(const json& value) {
  std::string text = value.dump();
  if (text.size() > 60) text = text.substr(0, 57) + "...";
  return text;
}

// One JSONL record with errors that name the file, the line and the field.
class Record {
 public:
  Record(const json& object, std::string where, std::string format)
      : object_(object), where_(std::move(where)), format_(std::move(format)) {}

  bool has(const std::string& key) const {
    return object_.contains(key) && !object_.at(key).is_null();
  }
  const json& required(const std::string& key) const {
    MOLE_CHECK(object_.contains(key), where_, ": missing field '", key, "' (format ", format_, ")");
    return object_.at(key);
  }
  std::string string(const std::string& key) const {
    const json& value = required(key);
    MOLE_CHECK(value.is_string(), where_, ": field '", key, "' must be a string, got ",
               brief(value), " (format ", format_, ")");
    return value.get<std::string>();
  }
  std::string optional_string(const std::string& key) const {
    return has(key) ? string(key) : std::string();
  }
  // An array of token ids in [0, vocab); with `allow_ignore`, -100 is accepted too.
  std::vector<int64_t> ids(const std::string& key, int64_t vocab, bool allow_ignore) const {
    const json& value = required(key);
    MOLE_CHECK(value.is_array(), where_, ": field '", key, "' must be an array of integers, got ",
               brief(value), " (format ", format_, ")");
    std::vector<int64_t> ids;
    ids.reserve(value.size());
    for (size_t i = 0; i < value.size(); ++i) {
      const json& v = value[i];
      MOLE_CHECK(v.is_number_integer(), where_, ": field '", key, "'[", i,
                 "] must be an integer, got ", brief(v));
      const bool in_vocab = v.is_number_unsigned()
                                ? v.get<uint64_t>() < static_cast<uint64_t>(vocab)
                                : v.get<int64_t>() >= 0 && v.get<int64_t>() < vocab;
      const bool ok = in_vocab || (allow_ignore && v.get<int64_t>() == kIgnore);
      MOLE_CHECK(ok, where_, ": field '", key, "'[", i, "] = ", v.dump(),
                 " is outside the vocabulary [0, ", vocab, ")",
                 allow_ignore ? " and is not -100" : "");
      ids.push_back(v.get<int64_t>());
    }
    return ids;
  }
  // {"messages": [{"role": ..., "content": ...}, ...]}, role and content strings.
  std::vector<ChatMessage> messages() const {
    const json& value = required("messages");
    MOLE_CHECK(value.is_array(), where_, ": field 'messages' must be an array of {role, content}, got ",
               brief(value), " (format ", format_, ")");
    std::vector<ChatMessage> messages;
    for (size_t i = 0; i < value.size(); ++i) {
      const json& m = value[i];
      MOLE_CHECK(m.is_object(), where_, ": messages[", i, "] must be an object {role, content}, got ", brief(m));
      for (const char* key : {"role", "content"}) {
        MOLE_CHECK(m.contains(key), where_, ": messages[", i, "] has no '", key, "'");
        MOLE_CHECK(m.at(key).is_string(), where_, ": messages[", i, "].", key, " must be a string, got ",
                   brief(m.at(key)));
      }
      messages.push_back({m.at("role").get<std::string>(), m.at("content").get<std::string>()});
    }
    return messages;
  }
  const std::string& where() const { return where_; }

 private:
  const json& object_;
  std::string where_;
  std::string format_;
};

// Alpaca template (Taori et al. 2023), without the preamble sentence.
std::string alpaca_prompt(const std::string& instruction, const std::string& input) {
  if (input.empty()) return "### Instruction:\n" + instruction + "\n\n### Response:\n";
  return "### Instruction:\n" + instruction + "\n\n### Input:\n" + input + "\n\n### Response:\n";
}

// [bos] + prompt + response + [eos]; the loss covers the response and eos only. Prompt and
// response are encoded separately so that the boundary falls exactly between them.
Example text_example(const Tokenizer& tokenizer, const std::string& prompt,
                     const std::string& response) {
  Example e;
  auto push = [&e](int64_t id, bool target) {
    e.input_ids.push_back(id);
    e.labels.push_back(target ? id : kIgnore);
  };
  if (tokenizer.bos_id() >= 0) push(tokenizer.bos_id(), false);
  for (int64_t id : tokenizer.encode(prompt)) push(id, false);
  for (int64_t id : tokenizer.encode(response)) push(id, true);
  if (tokenizer.eos_id() >= 0) push(tokenizer.eos_id(), true);
  return e;
}

// `chat`: the resolved chat template (format chat only).
Example record_example(const Record& r, const std::string& format, const ChatTemplate& chat,
                       const Tokenizer& tokenizer) {
  if (format == "chat") {
    return encode_chat(render_chat(chat, r.messages(), r.where()), tokenizer, r.where());
  }
  if (format == "alpaca") {
    const std::string instruction = r.string("instruction");
    const std::string input = r.optional_string("input");
    return text_example(tokenizer, alpaca_prompt(instruction, input), r.string("output"));
  }
  if (format == "prompt_response") {
    return text_example(tokenizer, r.string("prompt"), r.string("response"));
  }
  Example e;
  e.input_ids = r.ids("input_ids", tokenizer.vocab_size(), false);
  if (r.has("labels")) {
    e.labels = r.ids("labels", tokenizer.vocab_size(), true);
    MOLE_CHECK(e.labels.size() == e.input_ids.size(), r.where(), ": field 'labels' has ",
               e.labels.size(), " entries but 'input_ids' has ", e.input_ids.size());
  } else {
    e.labels = e.input_ids;
  }
  return e;
}

// Truncates to seq_len and keeps the example if a target token is left.
void add_example(Example e, int64_t seq_len, std::vector<Example>& out, DatasetStats& stats) {
  const bool cut = static_cast<int64_t>(e.input_ids.size()) > seq_len;
  if (cut) {
    e.input_ids.resize(seq_len);
    e.labels.resize(seq_len);
  }
  if (count_targets(e) == 0) {
    ++stats.dropped;
    return;
  }
  stats.truncated += cut;
  out.push_back(std::move(e));
}

// Runs `body`; an error from it that does not name `where` yet (e.g. the tokenizer's) is thrown
// again as a mole::Error that begins with it.
template <typename Body>
void with_location(const std::string& where, Body&& body) {
  try {
    body();
  } catch (const std::exception& e) {
    const std::string message = e.what();
    if (message.rfind(where, 0) == 0) throw;
    throw Error(where + ": " + message);
  }
}

bool is_blank(const std::string& line) {
  return line.find_first_not_of(" \t\r\n") == std::string::npos;
}

void load_jsonl(const DataOptions& options, const Tokenizer& tokenizer, std::vector<Example>& out,
                DatasetStats& stats) {
  const std::string& path = options.path;
  std::error_code ec;
  MOLE_CHECK(!std::filesystem::is_directory(path, ec), "data file '", path,
             "' is a directory; data.train and data.eval name a JSONL file");
  std::ifstream file(path, std::ios::binary);
  MOLE_CHECK(file.is_open(), "data file '", path, "' cannot be opened: ", std::strerror(errno));
  std::vector<std::pair<int64_t, std::string>> lines;  // (1-based number, text) of non-blank lines
  std::string line;
  for (int64_t number = 1; std::getline(file, line); ++number) {
    if (number == 1 && line.rfind("\xEF\xBB\xBF", 0) == 0) line.erase(0, 3);  // UTF-8 BOM
    if (!is_blank(line)) lines.emplace_back(number, std::move(line));
  }
  MOLE_CHECK(!file.bad(), "data file '", path, "': read error");
  MOLE_CHECK(!lines.empty(), "data file '", path, "' holds no examples (empty or only blank lines)");
  ChatTemplate chat;
  if (options.format == "chat") {
    chat = resolve_chat_template(options.chat_template, tokenizer);
    spdlog::info("{}: conversations rendered with chat template {}{}", path, chat.family,
                 chat.default_system.empty() ? "" : " (default system message: \"" + chat.default_system + "\")");
  }

  std::vector<Example> examples(lines.size());
  parallel_for(lines.size(), options.threads, [&](size_t i) {
    const std::string where = path + ":" + std::to_string(lines[i].first);
    with_location(where, [&] {
      json object;
      try {
        object = json::parse(lines[i].second);
      } catch (const json::parse_error& e) {
        std::string detail = e.what();  // "[json.exception...] parse error at line 1, column N: ..."
        if (const size_t at = detail.find("column "); at != std::string::npos) detail.erase(0, at);
        MOLE_FAIL(where, ": not valid JSON (", detail, ")");
      }
      MOLE_CHECK(object.is_object(), where, ": expected a JSON object, got ", object.type_name());
      examples[i] = record_example(Record(object, where, options.format), options.format, chat, tokenizer);
    });
  });
  for (Example& e : examples) add_example(std::move(e), options.seq_len, out, stats);
}

}  // namespace

void parallel_for(size_t n, int threads, const std::function<void(size_t)>& work) {
  if (n == 0) return;
  std::vector<std::string> errors(n);
  std::vector<char> failed(n, 0);
  const auto share = [&](size_t begin, size_t end) {
    for (size_t i = begin; i < end; ++i) {
      try {
        work(i);
      } catch (const std::exception& e) {
        errors[i] = e.what();
        failed[i] = 1;
        return;  // the rest of this share cannot hold the first error
      } catch (...) {
        errors[i] = "unknown error";
        failed[i] = 1;
        return;
      }
    }
  };
  const size_t count = std::clamp<size_t>(static_cast<size_t>(std::max(threads, 1)), 1, n);
  std::vector<std::thread> pool;
  size_t done = 1;  // shares started on threads (1..done-1) or that will run here (0)
  try {
    for (; done < count; ++done) pool.emplace_back(share, n * done / count, n * (done + 1) / count);
  } catch (const std::system_error&) {
    // No more threads: the shares not started run here, in order.
  }
  share(0, n / count);
  for (size_t t = done; t < count; ++t) share(n * t / count, n * (t + 1) / count);
  for (std::thread& thread : pool) thread.join();
  for (size_t i = 0; i < n; ++i) {
    if (failed[i]) throw Error(errors[i]);
  }
}

std::vector<Example> load_dataset(const DataOptions& options, const Tokenizer& tokenizer,
                                  DatasetStats* stats_out) {
  MOLE_CHECK(options.seq_len >= 2, "data.seq_len must be at least 2, got ", options.seq_len);
  DatasetStats stats;
  std::vector<Example> examples;
  if (options.path.rfind(kSyntheticPrefix, 0) == 0) {
    MOLE_CHECK(options.path == "synthetic:multitask", "data: unknown synthetic dataset '",
               options.path, "' (known: synthetic:multitask)");
    for (const auto& [prompt, response] :
         synthetic_multitask(options.synthetic_examples, options.seed)) {
      add_example(text_example(tokenizer, prompt, response), options.seq_len, examples, stats);
    }
  } else {
    const std::string& f = options.format;
    MOLE_CHECK(f == "alpaca" || f == "prompt_response" || f == "chat" || f == "tokens", "data.format '", f,
               "' is not one of alpaca, prompt_response, chat, tokens");
    load_jsonl(options, tokenizer, examples, stats);
  }
  stats.examples = static_cast<int64_t>(examples.size());
  if (stats.truncated > 0 || stats.dropped > 0) {
    spdlog::warn("{}: {} example(s) truncated to seq_len {}, {} dropped (no target token left)",
                 options.path, stats.truncated, options.seq_len, stats.dropped);
  }
  MOLE_CHECK(!examples.empty(), "data '", options.path, "': no usable example (all ", stats.dropped,
             " have no target token within seq_len ", options.seq_len, ")");
  if (stats_out) *stats_out = stats;
  return examples;
}

MicroBatch collate(const std::vector<const Example*>& examples, int64_t pad_id) {
  MOLE_CHECK(!examples.empty(), "collate: no examples");
  int64_t S = 0;
  for (const Example* e : examples) {
    MOLE_CHECK(!e->input_ids.empty() && e->input_ids.size() == e->labels.size(),
               "collate: an example has ", e->input_ids.size(), " input ids and ", e->labels.size(),
               " labels");
    S = std::max(S, static_cast<int64_t>(e->input_ids.size()));
  }
  const int64_t B = static_cast<int64_t>(examples.size());
  MicroBatch batch;
  batch.input_ids_BS = at::full({B, S}, pad_id, at::kLong);
  batch.labels_BS = at::full({B, S}, kIgnore, at::kLong);
  batch.valid_BS = at::zeros({B, S}, at::kBool);
  int64_t* ids = batch.input_ids_BS.data_ptr<int64_t>();
  int64_t* labels = batch.labels_BS.data_ptr<int64_t>();
  bool* valid = batch.valid_BS.data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    const Example& e = *examples[b];
    std::copy(e.input_ids.begin(), e.input_ids.end(), ids + b * S);
    std::copy(e.labels.begin(), e.labels.end(), labels + b * S);
    std::fill_n(valid + b * S, e.input_ids.size(), true);
    batch.num_target_tokens += count_targets(e);
  }
  return batch;
}

DataLoader::DataLoader(std::vector<Example> examples, int64_t micro_batch, int64_t global_batch,
                       int64_t rank, int64_t world, uint64_t seed, int64_t pad_id)
    : examples_(std::move(examples)),
      micro_batch_(micro_batch),
      global_batch_(global_batch),
      rank_(rank),
      world_(world),
      accumulation_(0),
      seed_(seed),
      pad_id_(pad_id) {
  MOLE_CHECK(!examples_.empty(), "data loader: the dataset is empty");
  MOLE_CHECK(micro_batch > 0, "train.micro_batch must be positive, got ", micro_batch);
  MOLE_CHECK(global_batch > 0, "train.global_batch must be positive, got ", global_batch);
  MOLE_CHECK(world > 0 && rank >= 0 && rank < world, "data loader: rank ", rank,
             " is outside world size ", world);
  MOLE_CHECK(pad_id >= 0, "data loader: pad id must be non-negative, got ", pad_id);
  MOLE_CHECK(global_batch % (micro_batch * world) == 0, "train.global_batch (", global_batch,
             ") must be a multiple of micro_batch (", micro_batch, ") x world size (", world, ")");
  accumulation_ = global_batch / (micro_batch * world);
}

std::vector<int64_t> DataLoader::order(int64_t epoch) const {
  const int64_t n = size();
  std::vector<int64_t> perm(n);
  for (int64_t i = 0; i < n; ++i) perm[i] = i;
  // An odd multiplier maps distinct epochs to distinct seeds.
  std::mt19937_64 rng(seed_ + static_cast<uint64_t>(epoch) * 0x9E3779B97F4A7C15ull);
  for (int64_t i = n - 1; i > 0; --i) {
    std::swap(perm[i], perm[below(rng, static_cast<uint64_t>(i) + 1)]);
  }
  return perm;
}

StepBatch DataLoader::next() {
  const int64_t n = size();
  StepBatch step;
  std::vector<int64_t> global;  // example indices of the global batch, in batch order
  global.reserve(global_batch_);
  std::vector<int64_t> perm;
  bool first = true;
  while (static_cast<int64_t>(global.size()) < global_batch_) {
    if (cursor_.position >= n) {
      ++cursor_.epoch;
      cursor_.position = 0;
      perm.clear();
    }
    if (perm.empty()) perm = order(cursor_.epoch);
    if (first) step.epoch = cursor_.epoch;
    first = false;
    global.push_back(perm[cursor_.position++]);
  }
  for (int64_t index : global) step.global_target_tokens += count_targets(examples_[index]);
  for (int64_t j = 0; j < accumulation_; ++j) {
    const int64_t start = (j * world_ + rank_) * micro_batch_;
    std::vector<const Example*> members;
    for (int64_t k = 0; k < micro_batch_; ++k) members.push_back(&examples_[global[start + k]]);
    step.micro_batches.push_back(collate(members, pad_id_));
  }
  return step;
}

void DataLoader::restore(const LoaderCursor& cursor) {
  MOLE_CHECK(cursor.epoch >= 0, "data loader: cannot restore epoch ", cursor.epoch);
  MOLE_CHECK(cursor.position >= 0 && cursor.position <= size(), "data loader: cannot restore ",
             "position ", cursor.position, " of epoch ", cursor.epoch, ": the dataset has ", size(),
             " examples (did the data change since the checkpoint?)");
  cursor_ = cursor;
}

}  // namespace mole::launch
