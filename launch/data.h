// The training data pipeline: tokenizers, JSONL datasets (alpaca, prompt/response, pre-tokenised),
// the built-in synthetic multi-task dataset, and a deterministic loader that cuts every global
// batch into per-rank micro-batches and can save and restore its position.
//
// Legend: B micro-batch, S sequence.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace mole::launch {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<int64_t> encode(const std::string& text) const = 0;  // no bos/eos added
  // With the special tokens the tokenizer adds around a text (bos first, by default).
  virtual std::vector<int64_t> encode_with_special(const std::string& text) const {
    std::vector<int64_t> ids = encode(text);
    if (bos_id() >= 0) ids.insert(ids.begin(), bos_id());
    return ids;
  }
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual int64_t vocab_size() const = 0;
  virtual int64_t bos_id() const = 0;  // -1 when the tokenizer has none
  virtual int64_t eos_id() const = 0;
  virtual int64_t pad_id() const = 0;  // padding positions also get label -100
  // Id of a token written as text (e.g. "<|eot_id|>"); -1 when the vocabulary has none.
  virtual int64_t token_id(const std::string& token) const {
    (void)token;
    return -1;
  }
  // The Jinja chat template of the model's tokenizer_config.json ("" when it has none).
  const std::string& chat_template() const { return chat_template_; }
  void set_chat_template(std::string jinja) { chat_template_ = std::move(jinja); }

 private:
  std::string chat_template_;
};

// "byte": UTF-8 bytes as ids 3..258 with pad 0, bos 1, eos 2 (vocab 259), for the built-in demo.
// Otherwise a Hugging Face tokenizer.json (launch/hf_tokenizer.h), a sentencepiece model file
// (`tokenizer.model` of LLaMA-2-style models), or a model folder holding one of them (both:
// tokenizer.json, and the log says so), or holding a `tokenizer_config.json` with
// "mole_tokenizer": "byte" (what mole writes next to the demo's synthetic base). Errors name the
// path.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec);

// The files (name -> bytes) that make a model folder carry the tokenizer `spec`, so that
// make_tokenizer(folder) finds it again: tokenizer_config.json for "byte", tokenizer.json (with
// its tokenizer_config.json), or tokenizer.model.
std::map<std::string, std::string> tokenizer_files(const std::string& spec);

struct Example {
  std::vector<int64_t> input_ids;  // bos + prompt + response + eos, truncated to seq_len
  std::vector<int64_t> labels;     // -100 on the prompt (and bos), the token ids elsewhere
};

struct DataOptions {
  std::string path;              // a .jsonl file or "synthetic:multitask"
  std::string format = "alpaca";  // alpaca | prompt_response | chat | tokens
  std::string chat_template = "auto";  // format chat: a family of launch/chat.h, or auto
  int64_t seq_len = 512;
  uint64_t seed = 42;            // synthetic generation
  int64_t synthetic_examples = 4096;
  int threads = 1;  // JSONL lines are tokenised on this many threads (the result does not depend on it)
};

struct DatasetStats {
  int64_t examples = 0;
  int64_t truncated = 0;       // examples longer than seq_len, cut to it
  int64_t dropped = 0;         // examples with no target token left after truncation
};

// Loads and tokenises every example. JSONL: one JSON object per line; blank lines skipped;
// alpaca {instruction, input?, output}; prompt_response {prompt, response}; chat {messages:
// [{role, content}]} rendered with a chat template, the loss on assistant turns only
// (launch/chat.h); tokens {input_ids, labels?} (labels default to input_ids). An example longer
// than seq_len keeps its first seq_len tokens; one with no target token left then is dropped
// (both counted and logged). Errors name the file and the 1-based line (bad JSON, missing or
// wrongly typed field, token id outside the vocabulary, a conversation the template cannot
// render); an empty file or one with no usable example is an error.
std::vector<Example> load_dataset(const DataOptions& options, const Tokenizer& tokenizer,
                                  DatasetStats* stats = nullptr);

// Runs work(i) for every i in [0, n) on up to `threads` threads, each a contiguous share; when
// some fail, the error of the smallest i is thrown (mole::Error with its message), as one thread
// going in order would have.
void parallel_for(size_t n, int threads, const std::function<void(size_t)>& work);

// The built-in multi-task data: several string transformations selected by a task tag in the
// prompt (e.g. "reverse: abc" -> "cba"), different enough that routing matters. Deterministic
// from `seed`.
std::vector<std::pair<std::string, std::string>> synthetic_multitask(int64_t count, uint64_t seed);

struct MicroBatch {
  at::Tensor input_ids_BS;  // int64, right-padded with the pad id
  at::Tensor labels_BS;     // int64, -100 on prompts and padding
  at::Tensor valid_BS;      // bool, real (non-padding) tokens
  int64_t num_target_tokens = 0;  // labels != -100 after the one-token shift
};

struct StepBatch {
  std::vector<MicroBatch> micro_batches;  // this rank's, in accumulation order
  int64_t global_target_tokens = 0;  // over the whole global batch, all ranks (no communication)
  int64_t epoch = 0;
};

struct LoaderCursor {
  int64_t epoch = 0;
  int64_t position = 0;  // examples of this epoch's order already consumed (global)
};

// Every optimizer step consumes `global_batch` examples of a seeded per-epoch shuffle (epochs
// wrap around). Micro-batch j (of accumulation) on rank r holds the examples
// [(j * world + r) * micro_batch, +micro_batch) of the global batch, so that ranks read disjoint,
// deterministic shards.
class DataLoader {
 public:
  DataLoader(std::vector<Example> examples, int64_t micro_batch, int64_t global_batch, int64_t rank,
             int64_t world, uint64_t seed, int64_t pad_id);
  StepBatch next();
  LoaderCursor cursor() const { return cursor_; }
  void restore(const LoaderCursor& cursor);
  int64_t accumulation_steps() const { return accumulation_; }
  int64_t size() const { return static_cast<int64_t>(examples_.size()); }

 private:
  std::vector<int64_t> order(int64_t epoch) const;
  std::vector<Example> examples_;
  int64_t micro_batch_, global_batch_, rank_, world_, accumulation_;
  uint64_t seed_;
  int64_t pad_id_;
  LoaderCursor cursor_;
};

// Right-pads examples into one micro-batch.
MicroBatch collate(const std::vector<const Example*>& examples, int64_t pad_id);

}  // namespace mole::launch
