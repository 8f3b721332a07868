// Training configuration: YAML in, validated Config out (see config.h).
#include "launch/config.h"

#include <spdlog/spdlog.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>

#include "kernels/check.h"
#include "moe/allocation.h"
#include "moe/model_presets.h"

namespace mole::launch {
namespace {

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const std::string& item : items) out += (out.empty() ? "" : ", ") + item;
  return out;
}

// Reads one mapping of the config, remembering which keys were used so that any other key is
// reported as unknown.
// The --set options given, by key path ("train.lr" -> "train.lr=.inf"): errors about those keys
// name the option instead of the file.
using Overrides = std::map<std::string, std::string>;

class Section {
 public:
  Section(YAML::Node node, std::string path, std::string source, const Overrides& overrides)
      : node_(std::move(node)),
        path_(std::move(path)),
        source_(std::move(source)),
        overrides_(overrides) {
    MOLE_CHECK(!node_ || node_.IsNull() || node_.IsMap(), origin(""), ": '", path_,
               "' must be a mapping of keys to values");
  }

  template <typename T>
  void get(const std::string& key, T& out) {
    known_.push_back(key);
    if (!node_ || node_.IsNull() || !node_[key] || node_[key].IsNull()) return;
    try {
      out = node_[key].as<T>();
    } catch (const YAML::Exception&) {
      MOLE_FAIL(origin(key), ": '", name(key), "' must be ", type_name<T>(), ", got '",
                YAML::Dump(node_[key]), "'");
    }
    if constexpr (std::is_floating_point_v<T>) {
      MOLE_CHECK(std::isfinite(out), origin(key), ": '", name(key), "' must be a finite number, got ",
                 YAML::Dump(node_[key]));
    }
  }

  void choice(const std::string& key, std::string& out, const std::vector<std::string>& allowed) {
    get(key, out);
    MOLE_CHECK(std::find(allowed.begin(), allowed.end(), out) != allowed.end(), origin(key), ": '",
               name(key), "' is '", out, "'; allowed: ", join(allowed));
  }

  YAML::Node raw(const std::string& key) {
    known_.push_back(key);
    return node_ && node_.IsMap() ? node_[key] : YAML::Node();
  }

  Section child(const std::string& key) {
    known_.push_back(key);
    return Section(node_ && node_.IsMap() ? node_[key] : YAML::Node(), name(key), source_,
                   overrides_);
  }

  // Every key present must have been asked for.
  void finish() const {
    if (!node_ || !node_.IsMap()) return;
    for (const auto& item : node_) {
      const std::string key = item.first.as<std::string>();
      MOLE_CHECK(std::find(known_.begin(), known_.end(), key) != known_.end(), origin(key),
                 ": unknown key '", name(key), "' (known in '", path_.empty() ? "<top>" : path_,
                 "': ", join(known_), ")");
    }
  }

  std::string name(const std::string& key) const { return path_.empty() ? key : path_ + "." + key; }
  // Where `key`'s value came from: "--set 'key=value'" or the config file.
  std::string origin(const std::string& key) const {
    const auto it = overrides_.find(name(key));
    return it == overrides_.end() ? source_ : "--set '" + it->second + "'";
  }

 private:
  template <typename T>
  static const char* type_name() {
    if constexpr (std::is_same_v<T, bool>) return "true or false";
    else if constexpr (std::is_integral_v<T>) return "an integer";
    else if constexpr (std::is_floating_point_v<T>) return "a number";
    else if constexpr (std::is_same_v<T, std::string>) return "a string";
    else return "a list of strings";
  }
  YAML::Node node_;
  std::string path_;
  std::string source_;
  const Overrides& overrides_;
  std::vector<std::string> known_;
};

void check(bool ok, const Section& s, const std::string& key, const std::string& what) {
  MOLE_CHECK(ok, s.origin(key), ": '", s.name(key), "' ", what);
}

// A mapping that names a key twice keeps only one value in YAML libraries: refuse it, naming the
// key path.
void check_unique_keys(const YAML::Node& node, const std::string& path, const std::string& source) {
  if (node.IsSequence()) {
    for (const YAML::Node& item : node) check_unique_keys(item, path, source);
    return;
  }
  if (!node.IsMap()) return;
  std::set<std::string> seen;
  for (const auto& item : node) {
    const std::string key = item.first.Scalar();
    const std::string full = path.empty() ? key : path + "." + key;
    MOLE_CHECK(seen.insert(key).second, source, ": key '", full,
               "' appears twice (YAML keeps only one of the values); keep one");
    check_unique_keys(item.second, full, source);
  }
}

void apply_override(YAML::Node& root, const std::string& assignment) {
  const size_t eq = assignment.find('=');
  MOLE_CHECK(eq != std::string::npos && eq > 0, "--set '", assignment,
             "': expected key=value, e.g. --set train.steps=50");
  const std::string path = assignment.substr(0, eq);
  YAML::Node value;
  try {
    value = YAML::Load(assignment.substr(eq + 1));
  } catch (const YAML::Exception& e) {
    MOLE_FAIL("--set '", assignment, "': value is not valid YAML (", e.what(), ")");
  }
  std::vector<std::string> keys;
  std::stringstream in(path);
  for (std::string key; std::getline(in, key, '.');) keys.push_back(key);
  std::vector<YAML::Node> chain = {root};
  for (size_t i = 0; i + 1 < keys.size(); ++i) {
    YAML::Node next = chain.back()[keys[i]];
    MOLE_CHECK(!next.IsDefined() || next.IsNull() || next.IsMap(), "--set '", assignment, "': '",
               keys[i], "' is not a section");
    chain.push_back(next);
  }
  chain.back()[keys.back()] = value;
}

void parse_adapter(Section s, AdapterSection& a) {
  s.choice("method", a.method, {"lora", "mixlora", "mola", "dynmole", "moelora"});
  s.get("r", a.r);
  check(a.r > 0, s, "r", "must be positive");
  s.get("alpha", a.alpha);
  check(a.alpha > 0, s, "alpha", "must be positive");
  s.get("dropout", a.dropout);
  check(a.dropout >= 0 && a.dropout < 1, s, "dropout", "must be in [0, 1)");
  s.get("rslora", a.rslora);
  s.get("dora", a.dora);
  check(!a.dora, s, "dora", "true is not supported yet (DoRA)");
  s.get("target_modules", a.target_modules);
  YAML::Node experts = s.raw("experts");
  if (experts && !experts.IsNull()) {
    if (experts.IsSequence()) {
      try {
        a.experts_list = experts.as<std::vector<int64_t>>();
      } catch (const YAML::Exception&) {
        MOLE_FAIL(s.origin("experts"), ": 'adapter.experts' list must hold integers");
      }
    } else {
      const std::string text = experts.as<std::string>();
      try {
        size_t used = 0;
        a.experts = std::stoll(text, &used);
        if (used != text.size()) a.experts_pattern = text;
      } catch (const std::exception&) {
        a.experts_pattern = text;
      }
    }
  }
  // The allocation rules check the counts (whether a pattern's groups divide the layers waits for
  // the model); `fewest` is the smallest count of any layer.
  int64_t fewest = 0;
  try {
    std::vector<int64_t> counts = {a.experts};
    if (!a.experts_list.empty()) {
      counts = a.experts_list;
      moe::check_expert_counts(counts, "per-layer expert list");
    } else if (!a.experts_pattern.empty()) {
      counts = moe::expert_pattern_groups(a.experts_pattern);
    } else {
      moe::uniform_allocation(a.experts, 1);
    }
    fewest = *std::min_element(counts.begin(), counts.end());
  } catch (const Error& e) {
    MOLE_FAIL(s.origin("experts"), ": 'adapter.experts': ", e.what(),
              " (a count, a per-layer list such as [2, 4] or a pattern such as \"2,4,6,8\")");
  }
  Section router = s.child("router");
  RouterSection& r = a.router;
  router.choice("strategy", r.strategy, {"auto", "topk", "topp", "switch", "dynmole", "dense"});
  router.get("top_k", r.top_k);
  check(r.top_k >= 1, router, "top_k", "must be at least 1, got " + std::to_string(r.top_k));
  router.get("top_p", r.top_p);
  check(r.top_p > 0 && r.top_p <= 1, router, "top_p", "must be in (0, 1]");
  router.get("jitter_noise", r.jitter_noise);
  check(r.jitter_noise >= 0 && r.jitter_noise < 1, router, "jitter_noise", "must be in [0, 1)");
  router.get("capacity_factor", r.capacity_factor);
  check(r.capacity_factor > 0, router, "capacity_factor", "must be positive");
  router.get("entropy_q", r.entropy_q);
  check(r.entropy_q > 0, router, "entropy_q", "must be positive");
  router.get("entropy_threshold", r.entropy_threshold);
  check(r.entropy_threshold >= 0 && r.entropy_threshold <= 1, router, "entropy_threshold",
        "must be in [0, 1]");
  router.get("keep_top_k", r.keep_top_k);
  check(r.keep_top_k >= 1, router, "keep_top_k", "must be at least 1, got " + std::to_string(r.keep_top_k));
  // The bound the routing rule reads (the same resolution of "auto" as the run's).
  const std::string rule = r.strategy != "auto" ? r.strategy : a.method == "dynmole" ? "dynmole" : "topk";
  const std::string key = rule == "topk" ? "top_k" : rule == "dynmole" ? "keep_top_k" : "";
  const int64_t k = rule == "topk" ? r.top_k : r.keep_top_k;
  if (a.method != "lora" && !key.empty()) {
    check(k <= fewest, router, key,
          "is " + std::to_string(k) + " but " +
              (a.experts_list.empty() && a.experts_pattern.empty() ? "adapter.experts is "
                                                                    : "the smallest layer of adapter.experts has ") +
              std::to_string(fewest) + " (a token cannot pick more experts than there are)");
  }
  router.finish();
  for (auto [key, value] : {std::pair<const char*, double*>{"aux_loss_coef", &a.aux_loss_coef},
                             {"z_loss_coef", &a.z_loss_coef},
                             {"entropy_loss_coef", &a.entropy_loss_coef},
                             {"contrastive_coef", &a.contrastive_coef}}) {
    s.get(key, *value);
    check(*value >= 0, s, key, "must be non-negative");
  }
  s.get("contrastive_temperature", a.contrastive_temperature);
  s.get("contrastive_samples", a.contrastive_samples);
  check(a.contrastive_temperature > 0, s, "contrastive_temperature", "must be positive");
  check(a.contrastive_samples >= 2, s, "contrastive_samples", "must be at least 2");
  s.choice("balance", a.balance, {"per_site", "all_sites"});
  s.get("router_init_range", a.router_init_range);
  check(a.router_init_range >= 0, s, "router_init_range",
        "must be at least 0 (0: every expert ties, so every token goes to the first top_k experts)");
  s.get("init_from", a.init_from);
  s.finish();
}

}  // namespace

Config parse_config(const std::string& yaml_text, const std::string& source,
                    const std::vector<std::string>& overrides) {
  YAML::Node root;
  try {
    root = YAML::Load(yaml_text);
  } catch (const YAML::Exception& e) {
    MOLE_FAIL(source, ": not valid YAML (", e.what(), ")");
  }
  if (!root || root.IsNull()) root = YAML::Node(YAML::NodeType::Map);
  MOLE_CHECK(root.IsMap(), source, ": the top level must be a mapping of sections");
  check_unique_keys(root, "", source);
  Overrides given;
  for (const std::string& o : overrides) {
    apply_override(root, o);
    given[o.substr(0, o.find('='))] = o;
  }

  Config c;
  Section top(root, "", source, given);
  top.get("name", c.name);
  MOLE_CHECK(!c.name.empty() && c.name.find('/') == std::string::npos, top.origin("name"),
             ": 'name' must be a non-empty name without '/'");

  Section model = top.child("model");
  model.get("base", c.model.base);
  check(!c.model.base.empty(), model, "base", "must name a Hugging Face folder or synthetic:<preset>");
  model.get("layers", c.model.layers);
  check(c.model.layers >= 0, model, "layers", "must be 0 (all) or the number of decoder layers to keep");
  if (c.model.base.rfind("synthetic:", 0) == 0) {
    const std::string preset = c.model.base.substr(10);
    const std::vector<std::string>& names = moe::model_preset_names();
    std::string known;
    for (const std::string& n : names) known += (known.empty() ? "synthetic:" : ", synthetic:") + n;
    check(std::find(names.begin(), names.end(), preset) != names.end(), model, "base",
          "names an unknown preset '" + preset + "' (known: " + known + ")");
    const int64_t preset_layers = moe::model_preset(preset).num_layers;
    check(c.model.layers <= preset_layers, model, "layers",
          "is " + std::to_string(c.model.layers) + " but " + c.model.base + " has " + std::to_string(preset_layers) +
              " decoder layers");
  } else {
    check(c.model.layers == 0, model, "layers", "applies to synthetic presets only (model.base synthetic:<preset>)");
  }
  model.choice("dtype", c.model.dtype, {"fp32", "bf16", "fp64"});
  model.choice("device", c.model.device, {"cpu", "cuda"});
  model.finish();

  parse_adapter(top.child("adapter"), c.adapter);

  Section data = top.child("data");
  data.get("train", c.data.train);
  check(!c.data.train.empty(), data, "train", "must name a JSONL file or synthetic:multitask");
  data.get("eval", c.data.eval);
  data.choice("format", c.data.format, {"alpaca", "prompt_response", "chat", "tokens"});
  data.choice("template", c.data.chat_template, {"auto", "llama3", "llama3.1", "chatml", "mistral", "llama2"});
  data.get("tokenizer", c.data.tokenizer);
  data.get("seq_len", c.data.seq_len);
  check(c.data.seq_len >= 2, data, "seq_len", "must be at least 2");
  data.get("synthetic_examples", c.data.synthetic_examples);
  check(c.data.synthetic_examples > 0, data, "synthetic_examples", "must be positive");
  data.finish();

  Section train = top.child("train");
  TrainSection& t = c.train;
  train.get("steps", t.steps);
  check(t.steps > 0, train, "steps", "must be positive");
  train.get("micro_batch", t.micro_batch);
  check(t.micro_batch > 0, train, "micro_batch", "must be positive");
  train.get("global_batch", t.global_batch);
  check(t.global_batch > 0, train, "global_batch", "must be positive");
  train.get("lr", t.lr);
  check(t.lr > 0 && t.lr <= 1, train, "lr",
        "must be in (0, 1] (fine-tuning rates are about 1e-5 to 1e-3; larger ones diverge)");
  train.choice("schedule", t.schedule, {"constant", "linear", "cosine"});
  train.get("warmup", t.warmup);
  check(t.warmup >= 0 && t.warmup <= t.steps, train, "warmup", "must be in [0, train.steps]");
  train.get("weight_decay", t.weight_decay);
  check(t.weight_decay >= 0, train, "weight_decay", "must be non-negative");
  train.get("clip", t.clip);
  check(t.clip >= 0, train, "clip", "must be non-negative (0 disables clipping)");
  train.get("seed", t.seed);
  train.get("lora_plus_ratio", t.lora_plus_ratio);
  check(t.lora_plus_ratio > 0, train, "lora_plus_ratio", "must be positive");
  train.get("eval_every", t.eval_every);
  check(t.eval_every >= 0, train, "eval_every", "must be non-negative");
  train.get("max_bad_steps", t.max_bad_steps);
  check(t.max_bad_steps >= 1, train, "max_bad_steps", "must be at least 1");
  train.get("activation_checkpointing", t.activation_checkpointing);
  train.finish();

  Section parallel = top.child("parallel");
  parallel.get("ep", c.parallel.ep);
  check(c.parallel.ep >= 1, parallel, "ep", "must be at least 1");
  parallel.get("zero", c.parallel.zero);
  check(c.parallel.zero >= 0 && c.parallel.zero <= 2, parallel, "zero", "must be 0, 1 or 2");
  parallel.get("zero_bucket_mib", c.parallel.zero_bucket_mib);
  check(c.parallel.zero_bucket_mib > 0 && c.parallel.zero_bucket_mib <= 65536, parallel,
        "zero_bucket_mib", "must be in (0, 65536]");
  parallel.get("base_shard", c.parallel.base_shard);
  check(c.parallel.base_shard >= 0, parallel, "base_shard",
        "must be 0 (off) or the number of ranks per base-shard group");
  parallel.choice("dispatch", c.parallel.dispatch, {"auto", "tokens", "weights"});
  parallel.choice("backend", c.parallel.backend, {"auto", "mpi", "gloo", "nccl"});
  parallel.get("timeout_s", c.parallel.timeout_s);
  check(c.parallel.timeout_s > 0, parallel, "timeout_s", "must be positive");
  parallel.finish();

  Section ckpt = top.child("checkpoint");
  ckpt.get("dir", c.checkpoint.dir);
  ckpt.get("every", c.checkpoint.every);
  check(c.checkpoint.every >= 0, ckpt, "every", "must be non-negative");
  ckpt.get("keep", c.checkpoint.keep);
  check(c.checkpoint.keep >= 1, ckpt, "keep", "must be at least 1");
  ckpt.get("resume", c.checkpoint.resume);
  check(!c.checkpoint.resume.empty(), ckpt, "resume",
        "must be auto, never or the path of a checkpoint folder");
  ckpt.get("async", c.checkpoint.async);
  ckpt.finish();

  Section log = top.child("log");
  log.get("dir", c.log.dir);
  log.get("every", c.log.every);
  check(c.log.every >= 1, log, "every", "must be at least 1");
  log.get("tensorboard", c.log.tensorboard);
  log.get("overwrite", c.log.overwrite);
  log.finish();
  if (c.log.dir.empty()) c.log.dir = "runs/" + c.name;
  top.finish();
  return c;
}

Config load_config(const std::string& path, const std::vector<std::string>& overrides) {
  std::error_code ec;
  MOLE_CHECK(!std::filesystem::is_directory(path, ec), "config '", path,
             "' is a directory; give the YAML file (e.g. examples/demo-mixlora.yaml)");
  std::ifstream in(path);
  MOLE_CHECK(in.good(), "cannot open config '", path, "'");
  const std::string text(std::istreambuf_iterator<char>(in), {});
  Config config = parse_config(text, path, overrides);
  const YAML::Node root = YAML::Load(text);  // valid: parse_config read it
  if (!root || root.IsNull()) {
    const Config defaults;
    spdlog::warn("{} is empty: every key not given by --set takes its default (model.base {}, "
                 "adapter.method {}, data.train {}, train.steps {}, log.dir runs/{})",
                 path, defaults.model.base, defaults.adapter.method, defaults.data.train,
                 defaults.train.steps, defaults.name);
  }
  return config;
}

std::string to_yaml(const Config& c) {
  YAML::Emitter out;
  out << YAML::BeginMap << YAML::Key << "name" << YAML::Value << c.name;
  out << YAML::Key << "model" << YAML::Value << YAML::BeginMap << YAML::Key << "base" << YAML::Value
      << c.model.base << YAML::Key << "layers" << YAML::Value << c.model.layers << YAML::Key << "dtype"
      << YAML::Value << c.model.dtype << YAML::Key
      << "device" << YAML::Value << c.model.device << YAML::EndMap;
  const AdapterSection& a = c.adapter;
  out << YAML::Key << "adapter" << YAML::Value << YAML::BeginMap;
  out << YAML::Key << "method" << YAML::Value << a.method << YAML::Key << "r" << YAML::Value << a.r
      << YAML::Key << "alpha" << YAML::Value << a.alpha << YAML::Key << "dropout" << YAML::Value
      << a.dropout << YAML::Key << "rslora" << YAML::Value << a.rslora << YAML::Key << "dora"
      << YAML::Value << a.dora << YAML::Key << "target_modules" << YAML::Value << YAML::Flow
      << a.target_modules << YAML::Key << "experts" << YAML::Value;
  if (!a.experts_list.empty()) out << YAML::Flow << a.experts_list;
  else if (!a.experts_pattern.empty()) out << YAML::DoubleQuoted << a.experts_pattern;
  else out << a.experts;
  out << YAML::Key << "router" << YAML::Value << YAML::BeginMap << YAML::Key << "strategy"
      << YAML::Value << a.router.strategy << YAML::Key << "top_k" << YAML::Value << a.router.top_k
      << YAML::Key << "top_p" << YAML::Value << a.router.top_p << YAML::Key << "jitter_noise"
      << YAML::Value << a.router.jitter_noise << YAML::Key << "capacity_factor" << YAML::Value
      << a.router.capacity_factor << YAML::Key << "entropy_q" << YAML::Value << a.router.entropy_q
      << YAML::Key << "entropy_threshold" << YAML::Value << a.router.entropy_threshold
      << YAML::Key << "keep_top_k" << YAML::Value << a.router.keep_top_k << YAML::EndMap;
  out << YAML::Key << "aux_loss_coef" << YAML::Value << a.aux_loss_coef << YAML::Key
      << "z_loss_coef" << YAML::Value << a.z_loss_coef << YAML::Key << "entropy_loss_coef"
      << YAML::Value << a.entropy_loss_coef << YAML::Key << "contrastive_coef" << YAML::Value
      << a.contrastive_coef << YAML::Key << "contrastive_temperature" << YAML::Value
      << a.contrastive_temperature << YAML::Key << "contrastive_samples" << YAML::Value
      << a.contrastive_samples << YAML::Key << "balance" << YAML::Value << a.balance << YAML::Key
      << "router_init_range" << YAML::Value << a.router_init_range << YAML::Key << "init_from"
      << YAML::Value << a.init_from << YAML::EndMap;
  const DataSection& d = c.data;
  out << YAML::Key << "data" << YAML::Value << YAML::BeginMap << YAML::Key << "train" << YAML::Value
      << d.train << YAML::Key << "eval" << YAML::Value << d.eval << YAML::Key << "format"
      << YAML::Value << d.format << YAML::Key << "template" << YAML::Value << d.chat_template
      << YAML::Key << "tokenizer" << YAML::Value << d.tokenizer
      << YAML::Key << "seq_len" << YAML::Value << d.seq_len << YAML::Key << "synthetic_examples"
      << YAML::Value << d.synthetic_examples << YAML::EndMap;
  const TrainSection& t = c.train;
  out << YAML::Key << "train" << YAML::Value << YAML::BeginMap << YAML::Key << "steps" << YAML::Value
      << t.steps << YAML::Key << "micro_batch" << YAML::Value << t.micro_batch << YAML::Key
      << "global_batch" << YAML::Value << t.global_batch << YAML::Key << "lr" << YAML::Value << t.lr
      << YAML::Key << "schedule" << YAML::Value << t.schedule << YAML::Key << "warmup" << YAML::Value
      << t.warmup << YAML::Key << "weight_decay" << YAML::Value << t.weight_decay << YAML::Key
      << "clip" << YAML::Value << t.clip << YAML::Key << "seed" << YAML::Value << t.seed << YAML::Key
      << "lora_plus_ratio" << YAML::Value << t.lora_plus_ratio << YAML::Key << "eval_every"
      << YAML::Value << t.eval_every << YAML::Key << "max_bad_steps" << YAML::Value
      << t.max_bad_steps << YAML::Key << "activation_checkpointing" << YAML::Value
      << t.activation_checkpointing << YAML::EndMap;
  const ParallelSection& p = c.parallel;
  out << YAML::Key << "parallel" << YAML::Value << YAML::BeginMap << YAML::Key << "ep" << YAML::Value
      << p.ep << YAML::Key << "zero" << YAML::Value << p.zero << YAML::Key << "zero_bucket_mib"
      << YAML::Value << p.zero_bucket_mib << YAML::Key << "base_shard"
      << YAML::Value << p.base_shard << YAML::Key << "dispatch" << YAML::Value << p.dispatch
      << YAML::Key << "backend" << YAML::Value << p.backend << YAML::Key << "timeout_s"
      << YAML::Value << p.timeout_s << YAML::EndMap;
  out << YAML::Key << "checkpoint" << YAML::Value << YAML::BeginMap << YAML::Key << "dir"
      << YAML::Value << c.checkpoint.dir << YAML::Key << "every" << YAML::Value << c.checkpoint.every
      << YAML::Key << "keep" << YAML::Value << c.checkpoint.keep << YAML::Key << "resume"
      << YAML::Value << c.checkpoint.resume << YAML::Key << "async" << YAML::Value << c.checkpoint.async
      << YAML::EndMap;
  out << YAML::Key << "log" << YAML::Value << YAML::BeginMap << YAML::Key << "dir" << YAML::Value
      << c.log.dir << YAML::Key << "every" << YAML::Value << c.log.every << YAML::Key
      << "tensorboard" << YAML::Value << c.log.tensorboard << YAML::Key << "overwrite"
      << YAML::Value << c.log.overwrite << YAML::EndMap;
  out << YAML::EndMap;
  return std::string(out.c_str()) + "\n";
}

}  // namespace mole::launch
