// The training configuration (DESIGN.md §8): YAML with a default for every key, `--set key=value`
// overrides, and errors that name the key and the allowed values. The resolved configuration is
// written back as YAML into the run folder.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace mole::launch {

struct ModelSection {
  // A Hugging Face folder, or synthetic:<preset>: a random-initialised model drawn from train.seed
  // in-process (tiny, the demo's, sized to the tokenizer; tiny-llama3, LLaMA-3's vocabulary and
  // attention layout at a CPU's size; or the real shapes of tinyllama,
  // llama-2-7b, llama-3-8b, llama-2-70b, llama-3-70b, mistral-7b, qwen2-7b).
  std::string base = "synthetic:tiny";
  int64_t layers = 0;  // synthetic presets: keep only the first N decoder layers (0: all)
  std::string dtype = "fp32";           // fp32 | bf16 (CUDA) | fp64 (CPU, exactness checks)
  std::string device = "cpu";           // cpu | cuda
};

struct RouterSection {
  std::string strategy = "auto";  // auto (by method) | topk | topp | switch | dynmole | dense
  int64_t top_k = 2;
  double top_p = 0.75;
  double jitter_noise = 0.0;
  double capacity_factor = 1.0;
  double entropy_q = 1.1;
  double entropy_threshold = 0.9;
  int64_t keep_top_k = 2;
};

struct AdapterSection {
  std::string method = "lora";  // lora | mixlora | mola | dynmole | moelora
  int64_t r = 16;
  double alpha = 32.0;
  double dropout = 0.05;
  bool rslora = false;
  bool dora = false;
  std::vector<std::string> target_modules = {"q_proj", "k_proj", "v_proj", "o_proj",
                                             "gate_proj", "up_proj", "down_proj"};
  // One of: a single count, a per-layer list, or a pattern string such as "2,4,6,8".
  int64_t experts = 8;
  std::vector<int64_t> experts_list;
  std::string experts_pattern;
  RouterSection router;
  double aux_loss_coef = 0.01;      // load balance
  double z_loss_coef = 0.001;       // switch routing only
  double entropy_loss_coef = 0.01;  // dynmole only
  double contrastive_coef = 0.1;    // moelora only
  double contrastive_temperature = 0.07;
  int64_t contrastive_samples = 64;
  std::string balance = "per_site";  // per_site | all_sites
  double router_init_range = 0.02;
  std::string init_from;  // adapter folder to start from (PEFT or MoE-PEFT)
};

struct DataSection {
  std::string train = "synthetic:multitask";
  std::string eval;  // empty: no evaluation; "synthetic:multitask" uses a held-out seed
  std::string format = "alpaca";  // alpaca | prompt_response | chat | tokens
  std::string tokenizer;          // empty: "byte" for synthetic data, else <model.base>
  // format chat: auto (the family of the tokenizer's own chat template) | llama3 | llama3.1 |
  // chatml | mistral | llama2 (launch/chat.h)
  std::string chat_template = "auto";
  int64_t seq_len = 512;
  int64_t synthetic_examples = 4096;
};

struct TrainSection {
  int64_t steps = 100;
  int64_t micro_batch = 8;
  int64_t global_batch = 32;
  double lr = 2e-4;
  std::string schedule = "constant";  // constant | linear | cosine
  int64_t warmup = 0;
  double weight_decay = 0.0;
  double clip = 1.0;  // 0: no clipping
  uint64_t seed = 42;
  double lora_plus_ratio = 1.0;  // LoRA+: lr of B matrices = lr x ratio
  int64_t eval_every = 0;        // 0: evaluate only at the end (when data.eval is set)
  int64_t max_bad_steps = 5;     // consecutive non-finite steps before stopping
  // Keep only each decoder layer's input in forward and recompute the layer in backward.
  bool activation_checkpointing = false;
};

struct ParallelSection {
  int64_t ep = 1;
  int64_t zero = 0;
  double zero_bucket_mib = 32.0;  // ZeRO's flat buffers (buckets) of trainable tensors
  int64_t base_shard = 0;  // ranks per frozen-base shard group; 0: off (DESIGN.md §8)
  std::string dispatch = "auto";
  std::string backend = "auto";
  double timeout_s = 300.0;
};

struct CheckpointSection {
  std::string dir;
  int64_t every = 0;
  int64_t keep = 3;
  std::string resume = "auto";
  // Copy the state to host memory at the step and write it on a thread of its own while
  // training goes on (one save at a time; a save's error ends the run at the next save or the end).
  bool async = false;
};

struct LogSection {
  std::string dir;  // default runs/<name>
  int64_t every = 10;
  bool tensorboard = true;
  // A log.dir that holds another run is refused unless true; then that run's files are replaced.
  bool overwrite = false;
};

struct Config {
  std::string name = "demo";
  ModelSection model;
  AdapterSection adapter;
  DataSection data;
  TrainSection train;
  ParallelSection parallel;
  CheckpointSection checkpoint;
  LogSection log;
};

// Parses YAML text (`source` names it in messages) with `overrides` ("key.path=value", value in
// YAML syntax) applied on top, then validates. Throws mole::Error naming the key.
Config parse_config(const std::string& yaml_text, const std::string& source,
                    const std::vector<std::string>& overrides = {});
Config load_config(const std::string& path, const std::vector<std::string>& overrides = {});
// The resolved configuration as YAML (every key).
std::string to_yaml(const Config& config);

}  // namespace mole::launch
