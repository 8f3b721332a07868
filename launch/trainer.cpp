// The training loop and what it is built from (see trainer.h).
#include "launch/trainer.h"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>
#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <deque>
#include <numeric>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>

#include "checkpoint/adapter_export.h"
#include "checkpoint/model_loader.h"
#include "checkpoint/moe_peft_adapter.h"
#include "dist/communicator.h"
#include "dist/process_grid.h"
#include "dist/runtime.h"
#include "kernels/check.h"
#include "launch/metrics_log.h"
#include "launch/optimizer.h"
#include "moe/allocation.h"
#include "moe/expert_shard.h"
#include "moe/precision.h"
#include "parallel/dispatch_plan.h"
#include "parallel/expert_dispatcher.h"
#include "parallel/gradient_reduction.h"

namespace mole::launch {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

bool is_synthetic_base(const Config& c) { return c.model.base == "synthetic:tiny"; }

// GPU ranks bind to their node-local device: local rank modulo the GPUs this process sees.
at::Device model_device(const Config& c) {
  if (c.model.device != "cuda") return at::Device(at::kCPU);
  const int gpus = at::detail::getCUDAHooks().getNumGPUs();
  const int local = dist::detect_rank_info().local_rank;
  return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(gpus > 0 ? local % gpus : 0));
}

double peak_memory_mib() {
  struct rusage usage;
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_maxrss) / 1024.0;
}

std::string format_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(std::max(0.0, seconds));
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(s / 3600), (long long)(s % 3600 / 60));
  else std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
  return buf;
}

// Options that the current build cannot honour yet are errors, not silent no-ops.
void check_supported(const Config& c) {
  MOLE_CHECK(c.parallel.zero == 0, "parallel.zero = ", c.parallel.zero,
             ": ZeRO optimizer sharding is not available yet");
  MOLE_CHECK(!c.parallel.base_shard, "parallel.base_shard: frozen-base sharding is not available yet");
  MOLE_CHECK(c.checkpoint.every == 0, "checkpoint.every = ", c.checkpoint.every,
             ": sharded training checkpoints are not available yet (set it to 0; the adapter is "
             "written at the end of the run)");
  MOLE_CHECK(!(c.model.dtype == "fp64" && c.model.device == "cuda"),
             "model.dtype fp64 is a CPU mode for exactness checks; use fp32 or bf16 on CUDA");
  MOLE_CHECK(!(c.model.dtype == "bf16" && c.model.device == "cpu"),
             "model.dtype bf16 is for CUDA (bf16 frozen base, float32 adapters); on CPU mole trains in "
             "fp32");
  MOLE_CHECK(c.model.device != "cuda" || at::hasCUDA(),
             "model.device is cuda but this LibTorch build has no usable CUDA device");
}

moe::RouterOptions router_options(const Config& c, moe::Method method) {
  const RouterSection& r = c.adapter.router;
  moe::RouterOptions o;
  if (r.strategy != "auto") o.strategy = moe::parse_routing_strategy(r.strategy);
  else if (method == moe::Method::kDynMole) o.strategy = moe::RoutingStrategy::kDynMole;
  else o.strategy = moe::RoutingStrategy::kTopK;
  o.top_k = r.top_k;
  o.top_p = r.top_p;
  o.jitter_noise = r.jitter_noise;
  o.capacity_factor = r.capacity_factor;
  o.entropy_q = r.entropy_q;
  o.entropy_threshold = r.entropy_threshold;
  o.keep_top_k = r.keep_top_k;
  return o;
}

moe::AuxLossOptions aux_options(const Config& c, const moe::AdapterSpec& spec) {
  moe::AuxLossOptions aux;
  aux.load_balance_coef = spec.is_moe() ? c.adapter.aux_loss_coef : 0.0;
  aux.z_loss_coef = spec.router.strategy == moe::RoutingStrategy::kSwitch ? c.adapter.z_loss_coef : 0.0;
  aux.entropy_coef = spec.router.strategy == moe::RoutingStrategy::kDynMole ? c.adapter.entropy_loss_coef : 0.0;
  aux.contrastive.coef = spec.method == moe::Method::kMoeLora ? c.adapter.contrastive_coef : 0.0;
  aux.contrastive.temperature = c.adapter.contrastive_temperature;
  aux.contrastive.max_samples = c.adapter.contrastive_samples;
  aux.balance_over_all_sites = c.adapter.balance == "all_sites";
  return aux;
}

moe::AdapterSpec adapter_spec(const Config& c, int64_t num_layers) {
  const AdapterSection& a = c.adapter;
  moe::AdapterSpec spec;
  spec.method = moe::parse_method(a.method);
  spec.lora = {a.r, a.alpha, a.rslora, a.dropout};
  spec.expert_lora = spec.lora;
  spec.target_modules = a.target_modules;
  spec.router_init_range = a.router_init_range;
  if (spec.is_moe()) {
    if (!a.experts_list.empty()) spec.experts_per_layer = moe::list_allocation(a.experts_list, num_layers);
    else if (!a.experts_pattern.empty()) spec.experts_per_layer = moe::pattern_allocation(a.experts_pattern, num_layers);
    else spec.experts_per_layer = moe::uniform_allocation(a.experts, num_layers);
  }
  spec.router = router_options(c, spec.method);
  spec.aux = aux_options(c, spec);
  return spec;
}

}  // namespace

moe::ModelConfig synthetic_tiny_config(int64_t vocab) {
  moe::ModelConfig c;
  c.vocab_size = vocab;
  c.hidden_size = 128;
  c.intermediate_size = 344;
  c.num_layers = 4;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 32;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 1024;
  return c;
}

EvalResult evaluate(const moe::CausalLM& model, const std::vector<Example>& examples,
                    int64_t micro_batch, int64_t pad_id, const moe::Dispatcher* dispatcher) {
  at::NoGradGuard no_grad;
  double loss_sum = 0.0;
  int64_t correct = 0, tokens = 0;
  for (size_t begin = 0; begin < examples.size(); begin += static_cast<size_t>(micro_batch)) {
    std::vector<const Example*> batch;
    for (size_t i = begin; i < std::min(examples.size(), begin + static_cast<size_t>(micro_batch)); ++i) {
      batch.push_back(&examples[i]);
    }
    MicroBatch mb = collate(batch, pad_id);
    moe::ForwardContext ctx;
    ctx.dispatcher = dispatcher;
    at::Tensor logits = model.forward(mb.input_ids_BS, ctx);
    moe::LossSum ls = moe::causal_lm_loss_sum(logits, mb.labels_BS);
    const int64_t S = logits.size(1);
    at::Tensor targets = mb.labels_BS.narrow(1, 1, S - 1).to(logits.device());
    at::Tensor predicted = logits.narrow(1, 0, S - 1).argmax(-1);
    at::Tensor counted = targets != -100;
    correct += (predicted.eq(targets).logical_and(counted)).sum().item<int64_t>();
    loss_sum += ls.sum.item<double>();
    tokens += ls.num_tokens;
  }
  EvalResult r;
  r.tokens = tokens;
  r.loss = tokens > 0 ? loss_sum / static_cast<double>(tokens) : std::nan("");
  r.accuracy = tokens > 0 ? static_cast<double>(correct) / static_cast<double>(tokens) : 0.0;
  return r;
}

struct Trainer::Impl {
  at::Generator gen;
  std::unique_ptr<DataLoader> loader;
  std::vector<Example> eval_examples;
  std::unique_ptr<AdamW> optimizer;
  int64_t step = 0;
  int64_t consecutive_bad = 0;
  int64_t skipped = 0;
  // Per-site routed pairs of the last step, for logging expert loads.
  std::vector<std::pair<std::string, std::vector<double>>> loads;
  std::map<std::string, double> aux_parts;
  // Multi-rank runs: expert-parallel dispatch (ep > 1) and the gradient reduction.
  std::unique_ptr<parallel::ExpertParallelDispatcher> dispatcher;
  std::unique_ptr<parallel::GradientReducer> reducer;
};

int Trainer::rank() const { return grid_ ? grid_->rank() : 0; }
int Trainer::world() const { return grid_ ? grid_->dims().world : 1; }

Trainer::Trainer(Config config, std::shared_ptr<dist::ProcessGrid> grid)
    : config_(std::move(config)), grid_(std::move(grid)), impl_(std::make_unique<Impl>()) {
  check_supported(config_);
  // One process with parallel.ep > 1 (not under mpirun) is a layout error like any other (the
  // process grid checks multi-rank layouts).
  if (!grid_) dist::ParallelDims{1, static_cast<int>(config_.parallel.ep)}.validate();
  const Config& c = config_;
  impl_->gen = at::make_generator<at::CPUGeneratorImpl>(c.train.seed);
  const bool synthetic = is_synthetic_base(c);
  std::string tokenizer_spec = c.data.tokenizer;
  if (tokenizer_spec.empty()) tokenizer_spec = synthetic ? "byte" : c.model.base;
  tokenizer_ = make_tokenizer(tokenizer_spec);

  at::TensorOptions options = at::TensorOptions()
                                  .dtype(c.model.dtype == "bf16"   ? at::kBFloat16
                                         : c.model.dtype == "fp64" ? at::kDouble
                                                                   : at::kFloat)
                                  .device(model_device(c));
  if (synthetic) {
    model_ = std::make_unique<moe::CausalLM>(synthetic_tiny_config(tokenizer_->vocab_size()), options);
    model_->init_base_random(impl_->gen);
  } else {
    model_ = ckpt::load_model(c.model.base, options);
  }
  MOLE_CHECK(tokenizer_->vocab_size() <= model_->config().vocab_size, "tokenizer '", tokenizer_spec,
             "' has ", tokenizer_->vocab_size(), " entries but the model's vocabulary is ",
             model_->config().vocab_size);

  spec_ = adapter_spec(c, model_->num_layers());
  if (!c.adapter.init_from.empty()) {
    moe::AuxLossOptions aux = spec_.aux;
    spec_ = ckpt::load_adapter(*model_, c.adapter.init_from);
    spec_.aux = aux;
  } else {
    moe::attach_adapter(*model_, spec_, impl_->gen);
  }
  // Every rank drew the full adapter from the same seed (as one rank would); under expert
  // parallelism each now keeps the experts placed on it.
  if (grid_ && grid_->dims().ep > 1) setup_expert_parallel();

  DataOptions data{c.data.train, c.data.format, c.data.seq_len, c.train.seed, c.data.synthetic_examples};
  DatasetStats stats;
  std::vector<Example> train = load_dataset(data, *tokenizer_, &stats);
  spdlog::info("data: {} training examples from {} ({} truncated to {} tokens, {} dropped)",
               train.size(), c.data.train, stats.truncated, c.data.seq_len, stats.dropped);
  if (!c.data.eval.empty()) {
    DataOptions eval = data;
    eval.path = c.data.eval;
    eval.seed = c.train.seed + 1;  // held-out synthetic examples
    eval.synthetic_examples = std::min<int64_t>(256, c.data.synthetic_examples);
    impl_->eval_examples = load_dataset(eval, *tokenizer_);
  }
  impl_->loader = std::make_unique<DataLoader>(std::move(train), c.train.micro_batch,
                                               c.train.global_batch, rank(), world(),
                                               c.train.seed, tokenizer_->pad_id());
  AdamWOptions adam;
  adam.weight_decay = c.train.weight_decay;
  adam.lora_plus_ratio = c.train.lora_plus_ratio;
  impl_->optimizer = std::make_unique<AdamW>(model_->trainable_parameters(), adam);
  if (grid_) {
    std::vector<at::Tensor> shards = moe::sharded_expert_tensors(*model_), replicated;
    for (const auto& [name, t] : impl_->optimizer->params()) {
      const bool shard = std::any_of(shards.begin(), shards.end(),
                                     [&](const at::Tensor& x) { return x.is_same(t); });
      if (!shard) replicated.push_back(t);
    }
    impl_->reducer = std::make_unique<parallel::GradientReducer>(*grid_, std::move(replicated),
                                                                 std::move(shards));
  }
  int64_t trainable = 0;
  for (const auto& [name, t] : impl_->optimizer->params()) trainable += t.numel();
  spdlog::info("adapter: {} with {} trainable parameters in {} tensors", moe::method_name(spec_.method),
               trainable, impl_->optimizer->params().size());
}

Trainer::~Trainer() = default;

void Trainer::setup_expert_parallel() {
  const Config& c = config_;
  parallel::DispatchPlanOptions o;
  o.requested = c.parallel.dispatch;
  o.ep = grid_->dims().ep;
  o.tokens = c.train.micro_batch * c.data.seq_len;
  o.row_bytes = static_cast<int64_t>(at::elementSize(model_->options().dtype().toScalarType()));
  o.param_bytes = static_cast<int64_t>(at::elementSize(moe::adapter_dtype(model_->options().dtype().toScalarType())));
  const std::vector<parallel::SiteDispatch> plan = parallel::plan_dispatch(moe::moe_sites(*model_), o);
  spdlog::info("expert parallel: ep {} x edp {}, dispatch {} (estimates for T = {} tokens per micro-batch)",
               grid_->dims().ep, grid_->dims().edp(), c.parallel.dispatch, o.tokens);
  for (const std::string& line : parallel::describe_dispatch(plan)) spdlog::info("  {}", line);
  if (plan.empty()) spdlog::info("  the adapter has no MoE sites: nothing to shard");
  impl_->dispatcher = std::make_unique<parallel::ExpertParallelDispatcher>(grid_->ep(), parallel::dispatch_modes(plan));
  moe::shard_experts(*model_, *impl_->dispatcher);
}

StepResult Trainer::step() {
  StepResult r = accumulate_gradients();
  apply_update(r);
  return r;
}

StepResult Trainer::accumulate_gradients() {
  const Config& c = config_;
  Impl& s = *impl_;
  StepResult r;
  r.step = s.step;
  r.lr = learning_rate(c.train.schedule, c.train.lr, s.step, c.train.warmup, c.train.steps);
  StepBatch batch = s.loader->next();
  r.target_tokens = batch.global_target_tokens;
  MOLE_CHECK(batch.global_target_tokens > 0, "step ", s.step, ": the global batch has no target tokens");
  const double accumulation = static_cast<double>(batch.micro_batches.size());
  const at::Device device = model_->options().device();
  moe::SumOverRanks sum_over_ranks;
  if (world() > 1) {
    sum_over_ranks = [this](const at::Tensor& t) {
      at::Tensor buffer = t.detach().to(grid_->world().tensor_device()).contiguous().clone();
      grid_->world().all_reduce(buffer, dist::ReduceOp::kSum)->wait();
      return buffer.to(t.device());
    };
  }
  s.loads.clear();
  s.aux_parts.clear();
  for (const MicroBatch& mb : batch.micro_batches) {
    moe::ForwardContext ctx;
    ctx.training = true;
    ctx.generator = s.gen;
    ctx.valid_T = mb.valid_BS.reshape({-1}).to(device);
    ctx.dispatcher = s.dispatcher.get();
    at::Tensor logits = model_->forward(mb.input_ids_BS, ctx);
    moe::LossSum ls = moe::causal_lm_loss_sum(logits, mb.labels_BS);
    // Normalised once by the step's global target-token count, so micro-batches simply add up.
    at::Tensor lm = ls.sum / static_cast<double>(batch.global_target_tokens);
    moe::AuxLosses aux = moe::aux_losses(ctx, spec_.aux, sum_over_ranks);
    (lm + aux.total / accumulation).backward();
    r.loss += lm.item<double>();
    r.aux_loss += aux.total.item<double>() / accumulation;
    r.tokens += mb.valid_BS.sum().item<int64_t>();
    const std::pair<const char*, const at::Tensor*> parts[] = {
        {"load_balance", &aux.load_balance}, {"z_loss", &aux.z_loss},
        {"entropy_loss", &aux.entropy}, {"contrastive_loss", &aux.contrastive}};
    for (const auto& [name, t] : parts) {
      if (t->defined()) s.aux_parts[name] += t->item<double>() / accumulation;
    }
    auto loads = moe::expert_loads(ctx);
    if (s.loads.empty()) s.loads = loads;
    else for (size_t i = 0; i < loads.size(); ++i)
      for (size_t e = 0; e < loads[i].second.size(); ++e) s.loads[i].second[e] += loads[i].second[e];
  }
  for (auto& [site, loads] : s.loads) {
    for (double& l : loads) l /= accumulation;
  }
  if (world() > 1) {
    s.reducer->reduce();  // replicated tensors over the world, expert shards over their EDP group
    // The LM loss adds up over ranks (each normalised by the global token count); the aux losses
    // were already formed from global statistics and agree on every rank.
    at::Tensor totals = at::tensor({r.loss, static_cast<double>(r.tokens)}, at::kDouble)
                            .to(grid_->world().tensor_device());
    grid_->world().all_reduce(totals, dist::ReduceOp::kSum)->wait();
    r.loss = totals[0].item<double>();
    r.tokens = static_cast<int64_t>(std::llround(totals[1].item<double>()));
  }
  return r;
}

void Trainer::apply_update(StepResult& r) {
  const Config& c = config_;
  Impl& s = *impl_;
  const auto& params = s.optimizer->params();
  r.grad_norm = s.reducer ? s.reducer->global_norm() : global_grad_norm(params);
  if (!std::isfinite(r.loss) || !std::isfinite(r.aux_loss) || !std::isfinite(r.grad_norm)) {
    r.skipped = true;
    ++s.skipped;
    ++s.consecutive_bad;
    s.optimizer->zero_grad();
    spdlog::warn("step {}: non-finite loss or gradient (loss {}, aux {}, grad norm {}); update skipped",
                 s.step + 1, r.loss, r.aux_loss, r.grad_norm);
    MOLE_CHECK(s.consecutive_bad < c.train.max_bad_steps, "stopping: ", s.consecutive_bad,
               " consecutive steps had a non-finite loss or gradient (train.max_bad_steps = ",
               c.train.max_bad_steps, "); lower train.lr or check the data");
  } else {
    s.consecutive_bad = 0;
    clip_grad_norm(params, c.train.clip, r.grad_norm);
    s.optimizer->step(r.lr);
    s.optimizer->zero_grad();
  }
  ++s.step;
}

TrainSummary Trainer::run() {
  const Config& c = config_;
  Impl& s = *impl_;
  // Rank 0 writes the run folder and the logs; the other ranks only train.
  const bool lead = rank() == 0;
  std::ofstream metrics;
  std::unique_ptr<TensorBoardWriter> tb;
  if (lead) {
    fs::create_directories(c.log.dir);
    std::ofstream(c.log.dir + "/config.yaml") << to_yaml(c);
    metrics.open(c.log.dir + "/metrics.jsonl", std::ios::app);
    MOLE_CHECK(metrics.good(), "cannot write '", c.log.dir, "/metrics.jsonl'");
    if (c.log.tensorboard) tb = std::make_unique<TensorBoardWriter>(c.log.dir);
  }
  // No progress bar under mpirun, whose forwarded stdout may look like a terminal.
  const bool tty = world() == 1 && isatty(fileno(stdout));

  TrainSummary summary;
  summary.run_dir = c.log.dir;
  summary.eval_loss = std::nan("");
  const auto start = Clock::now();
  auto window_start = start;
  int64_t window_tokens = 0, total_target_tokens = 0;
  std::deque<double> recent_losses;
  auto run_eval = [&](int64_t step) {
    // Under expert parallelism every rank takes part in the forward passes (same examples).
    if (s.eval_examples.empty() || (!lead && !s.dispatcher)) return;
    EvalResult e = evaluate(*model_, s.eval_examples, c.train.micro_batch, tokenizer_->pad_id(),
                            s.dispatcher.get());
    if (!lead) return;
    summary.eval_loss = e.loss;
    summary.eval_accuracy = e.accuracy;
    spdlog::info("eval step {} | loss {:.4f} | accuracy {:.3f} over {} tokens", step, e.loss, e.accuracy, e.tokens);
    metrics << nlohmann::json{{"step", step}, {"eval_loss", e.loss}, {"eval_accuracy", e.accuracy}}.dump() << "\n";
    if (tb) {
      tb->add_scalar("eval/loss", step, e.loss);
      tb->add_scalar("eval/accuracy", step, e.accuracy);
    }
  };

  for (int64_t i = 0; i < c.train.steps; ++i) {
    StepResult r = step();
    window_tokens += r.tokens;
    total_target_tokens += r.target_tokens;
    if (i == 0) summary.first_loss = r.loss;
    if (!r.skipped) recent_losses.push_back(r.loss);
    if (recent_losses.size() > 10) recent_losses.pop_front();
    summary.last_loss = std::accumulate(recent_losses.begin(), recent_losses.end(), 0.0) /
                        static_cast<double>(std::max<size_t>(1, recent_losses.size()));
    const int64_t done = i + 1;
    const double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    if (tty) {
      const int width = 30, filled = static_cast<int>(width * done / c.train.steps);
      std::printf("\r[%s%s] %lld/%lld loss %.4f ", std::string(filled, '#').c_str(),
                  std::string(width - filled, '.').c_str(), (long long)done, (long long)c.train.steps, r.loss);
      std::fflush(stdout);
    }
    if (lead && (done % c.log.every == 0 || done == 1 || done == c.train.steps)) {
      const double window = std::chrono::duration<double>(Clock::now() - window_start).count();
      const double tps = window > 0 ? static_cast<double>(window_tokens) / window : 0.0;
      const double eta = elapsed / static_cast<double>(done) * static_cast<double>(c.train.steps - done);
      if (tty) std::printf("\r%s\r", std::string(80, ' ').c_str());
      spdlog::info("step {}/{} | loss {:.4f} | aux {:.4f} | lr {:.2e} | grad {:.3f} | {:.0f} tok/s | eta {} | mem {:.0f} MiB{}",
                   done, c.train.steps, r.loss, r.aux_loss, r.lr, r.grad_norm, tps, format_duration(eta),
                   peak_memory_mib(), r.skipped ? " | skipped" : "");
      nlohmann::json line = {{"step", done}, {"loss", r.loss}, {"lr", r.lr}, {"grad_norm", r.grad_norm},
                             {"tokens_per_s", tps}, {"peak_mem_mib", peak_memory_mib()},
                             {"skipped", r.skipped}, {"elapsed_s", elapsed}};
      if (spec_.is_moe()) {
        line["aux_loss"] = r.aux_loss;
        for (const auto& [name, value] : s.aux_parts) line[name] = value;
        nlohmann::json loads = nlohmann::json::object();
        for (const auto& [site, l] : s.loads) loads[site] = l;
        line["expert_load"] = loads;
      }
      metrics << line.dump() << "\n";
      metrics.flush();
      if (tb) {
        tb->add_scalar("train/loss", done, r.loss);
        tb->add_scalar("train/lr", done, r.lr);
        tb->add_scalar("train/grad_norm", done, r.grad_norm);
        tb->add_scalar("train/tokens_per_s", done, tps);
        if (spec_.is_moe()) {
          tb->add_scalar("train/aux_loss", done, r.aux_loss);
          for (const auto& [site, l] : s.loads) {
            for (size_t e = 0; e < l.size(); ++e) {
              tb->add_scalar("expert_load/" + site + "/" + std::to_string(e), done, l[e]);
            }
          }
        }
        tb->flush();
      }
      window_start = Clock::now();
      window_tokens = 0;
    }
    if (c.train.eval_every > 0 && done % c.train.eval_every == 0 && done != c.train.steps) run_eval(done);
  }
  run_eval(c.train.steps);
  summary.steps = c.train.steps;
  summary.skipped_steps = s.skipped;
  summary.wall_s = std::chrono::duration<double>(Clock::now() - start).count();
  summary.tokens_per_s = summary.wall_s > 0 ? static_cast<double>(total_target_tokens) / summary.wall_s : 0.0;

  // Collective: rank 0 writes the full expert stacks.
  if (s.dispatcher) moe::unshard_experts(*model_, *s.dispatcher);
  if (!lead) return summary;
  const std::string base = is_synthetic_base(c) ? c.log.dir + "/base" : c.model.base;
  if (is_synthetic_base(c)) ckpt::save_hf_model(*model_, base);
  ckpt::save_adapter(*model_, spec_, c.log.dir + "/adapter", base);
  nlohmann::json done = {{"steps", summary.steps}, {"skipped_steps", summary.skipped_steps},
                         {"first_loss", summary.first_loss}, {"last_loss", summary.last_loss},
                         {"wall_s", summary.wall_s}, {"target_tokens_per_s", summary.tokens_per_s}};
  if (!std::isnan(summary.eval_loss)) {
    done["eval_loss"] = summary.eval_loss;
    done["eval_accuracy"] = summary.eval_accuracy;
  }
  std::ofstream(c.log.dir + "/summary.json") << done.dump(2) << "\n";
  return summary;
}

}  // namespace mole::launch
