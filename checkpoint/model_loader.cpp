// Hugging Face folder -> CausalLM (see model_loader.h).
#include "checkpoint/model_loader.h"

#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <set>

#include "checkpoint/hf_config.h"
#include "checkpoint/safetensors.h"
#include "kernels/check.h"

namespace mole::ckpt {

void check_finite(const at::Tensor& t, const std::string& what) {
  if (!at::isFloatingType(t.scalar_type()) || at::isfinite(t).all().item<bool>()) return;
  const at::Tensor bad = at::logical_not(at::isfinite(t)).reshape({-1});
  const int64_t count = bad.sum().item<int64_t>();
  const int64_t first = bad.nonzero().min().item<int64_t>();
  MOLE_FAIL(what, " holds ", count, " non-finite value(s) (NaN or inf) of ", t.numel(),
            ", the first at flat index ", first, " (", t.reshape({-1})[first].item<double>(),
            "); the file is damaged or was saved from a diverged run");
}

std::unique_ptr<moe::CausalLM> load_model(const std::string& dir, const at::TensorOptions& options,
                                          std::shared_ptr<moe::BaseWeights> weights) {
  moe::ModelConfig config = load_hf_config(dir);
  st::CheckpointReader reader(dir);
  auto model = std::make_unique<moe::CausalLM>(config, options, std::move(weights));

  at::NoGradGuard no_grad;
  std::set<std::string> used;
  model->for_each_base_parameter([&](const std::string& name, const at::Tensor& param) {
    MOLE_CHECK(reader.contains(name), "model folder '", dir, "' has no tensor '", name,
               "' (expected shape ", param.sizes(), " for model_type ", config.model_type, ")");
    at::Tensor src = reader.tensor(name);
    MOLE_CHECK(src.sizes() == param.sizes(), "tensor '", name, "' in '", dir, "' has shape ",
               src.sizes(), " but the config implies ", param.sizes());
    MOLE_CHECK(at::isFloatingType(src.scalar_type()), "tensor '", name, "' in '", dir,
               "' has dtype ", src.scalar_type(), "; expected a floating-point weight");
    // Only the part this rank keeps is read from the mapping (and so only it becomes resident).
    check_finite(model->base_weights().kept_part(name, src), "tensor '" + name + "' in '" + dir + "'");
    model->base_weights().assign(name, src);
    used.insert(name);
  });

  std::vector<std::string> unused;
  for (const std::string& name : reader.names()) {
    if (!used.count(name) && !(config.tie_word_embeddings && name == "lm_head.weight")) {
      unused.push_back(name);
    }
  }
  if (!unused.empty()) {
    spdlog::warn("{} tensor(s) in '{}' are not used by the model, e.g. '{}'", unused.size(), dir,
                 unused.front());
  }
  spdlog::info("loaded {} ({} layers, hidden {}, {} heads / {} kv heads, vocab {}) from {}",
               config.model_type, config.num_layers, config.hidden_size, config.num_heads,
               config.num_kv_heads, config.vocab_size, dir);
  // What the load made resident of the mapped files in this process: with a sharded base, about
  // this rank's part.
  const int64_t resident = reader.resident_bytes();
  if (resident >= 0) {
    spdlog::info("base files: {:.2f} MiB of the {:.2f} MiB mapped were read into this process", resident / 1048576.0,
                 static_cast<double>(reader.file_bytes()) / 1048576.0);
  }
  return model;
}

}  // namespace mole::ckpt
