// Rank 0's metrics: run folder files and console (see metrics_sink.h).
#include "launch/metrics_sink.h"

#include <nlohmann/json.hpp>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>
#include <vector>

#include "checkpoint/atomic_file.h"
#include "kernels/check.h"
#include "launch/memory_stats.h"
#include "launch/metrics_log.h"

namespace mole::launch {
namespace {

namespace fs = std::filesystem;

std::string format_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(std::max(0.0, seconds));
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%lldh%02lldm", (long long)(s / 3600), (long long)(s % 3600 / 60));
  else std::snprintf(buf, sizeof buf, "%lldm%02llds", (long long)(s / 60), (long long)(s % 60));
  return buf;
}

// The entries of a run folder that belong to a run, present in `dir`.
std::vector<std::string> run_entries(const std::string& dir) {
  std::vector<std::string> found;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return found;
  for (const fs::directory_entry& entry : fs::directory_iterator(dir, ec)) {
    const std::string name = entry.path().filename().string();
    const bool run_file = name == "config.yaml" || name == "metrics.jsonl" ||
                          name == "summary.json" || name == "adapter" || name == "base" || name == "ckpt" ||
                          name.rfind("events.out.tfevents.", 0) == 0;
    if (run_file) found.push_back(name);
  }
  std::sort(found.begin(), found.end());
  return found;
}

}  // namespace

void claim_run_folder(const Config& config, bool lead) {
  const std::string& dir = config.log.dir;
  const std::vector<std::string> found = run_entries(dir);
  if (found.empty()) return;
  std::string list;
  for (const std::string& name : found) list += (list.empty() ? "" : ", ") + name;
  MOLE_CHECK(config.log.overwrite, "log.dir '", dir, "' holds another run (", list,
             "); start fresh in another folder (--set log.dir=", dir,
             "-2), replace that run with --set log.overwrite=true, or continue it from a checkpoint "
             "(checkpoint.resume: auto finds <checkpoint.dir>/latest)");
  if (!lead) return;
  spdlog::warn("log.overwrite: replacing the run in '{}' ({})", dir, list);
  for (const std::string& name : found) {
    std::error_code ec;
    fs::remove_all(fs::path(dir) / name, ec);
    MOLE_CHECK(!ec, "log.overwrite: cannot remove '", dir, "/", name, "': ", ec.message());
  }
}

MetricsSink::MetricsSink(const Config& config, bool lead, bool show_progress, bool moe_method,
                         const at::Device& device, int64_t resumed_step)
    : config_(config), lead_(lead), tty_(show_progress), moe_(moe_method), device_(device) {
  summary_.run_dir = config.log.dir;
  summary_.eval_loss = std::nan("");
  if (lead_) {
    fs::create_directories(config.log.dir);
    ckpt::write_file_atomic(config.log.dir + "/config.yaml", to_yaml(config));
    const std::string log = config.log.dir + "/metrics.jsonl";
    if (resumed_step >= 0 && fs::exists(log)) {
      // Lines of steps after the checkpoint were made by the run that stopped; they are made
      // again now.
      std::ifstream in(log);
      std::string line, kept;
      while (std::getline(in, line)) {
        const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
        // Also drops a line the stopped run left cut.
        if (!j.is_object() || (j.contains("step") && j["step"].is_number() &&
                               j["step"].get<int64_t>() > resumed_step)) {
          continue;
        }
        kept += line + "\n";
      }
      ckpt::write_file_atomic(log, kept);
    }
    metrics_ = std::make_unique<ckpt::AppendLog>(config.log.dir + "/metrics.jsonl");
    if (config.log.tensorboard) {
      tb_ = std::make_unique<TensorBoardWriter>(config.log.dir);
      // The stopped run's events of later steps (in its own event file) are made again now.
      if (resumed_step >= 0) tb_->add_restart(resumed_step + 1);
    }
  }
  start_ = window_start_ = Clock::now();
}

MetricsSink::~MetricsSink() = default;

void MetricsSink::on_step(const StepResult& r) {
  const int64_t done = r.step + 1, total = config_.train.steps;
  window_tokens_ += r.tokens;
  total_target_tokens_ += r.target_tokens;
  if (steps_seen_++ == 0) summary_.first_loss = r.loss;
  if (!r.skipped) recent_losses_.push_back(r.loss);
  if (recent_losses_.size() > 10) recent_losses_.pop_front();
  summary_.last_loss = std::accumulate(recent_losses_.begin(), recent_losses_.end(), 0.0) /
                       static_cast<double>(std::max<size_t>(1, recent_losses_.size()));
  summary_.steps = done;
  if (r.skipped) ++summary_.skipped_steps;
  const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
  if (tty_) {
    const int width = 30, filled = static_cast<int>(width * done / total);
    std::printf("\r[%s%s] %lld/%lld loss %.4f ", std::string(filled, '#').c_str(),
                std::string(width - filled, '.').c_str(), (long long)done, (long long)total, r.loss);
    std::fflush(stdout);
  }
  if (lead_ && (done % config_.log.every == 0 || done == 1 || done == total)) log_step(done, r, elapsed);
}

void MetricsSink::log_step(int64_t done, const StepResult& r, double elapsed) {
  const int64_t total = config_.train.steps;
  const double window = std::chrono::duration<double>(Clock::now() - window_start_).count();
  const double tps = window > 0 ? static_cast<double>(window_tokens_) / window : 0.0;
  const double eta = elapsed / static_cast<double>(steps_seen_) * static_cast<double>(total - done);
  if (tty_) std::printf("\r%s\r", std::string(80, ' ').c_str());
  // On CUDA also the caching allocator's peak on the device during the step (reset at its start).
  const int64_t gpu_bytes = peak_cuda_allocated_bytes(device_);
  const double gpu_gib = static_cast<double>(gpu_bytes) / (1024.0 * 1024.0 * 1024.0);
  const std::string gpu = gpu_bytes >= 0 ? fmt::format(" | gpu {:.2f} GiB", gpu_gib) : "";
  spdlog::info("step {}/{} | loss {:.4f} | aux {:.4f} | lr {:.2e} | grad {:.3f} | {:.0f} tok/s | eta {} | mem {:.0f} MiB{}{}",
               done, total, r.loss, r.aux_loss, r.lr, r.grad_norm, tps, format_duration(eta),
               peak_host_mib(), gpu, r.skipped ? " | skipped" : "");
  nlohmann::json line = {{"step", done}, {"loss", r.loss}, {"lr", r.lr}, {"grad_norm", r.grad_norm},
                         {"tokens_per_s", tps}, {"peak_mem_mib", peak_host_mib()},
                         {"skipped", r.skipped}, {"elapsed_s", elapsed}};
  if (gpu_bytes >= 0) line["peak_gpu_gib"] = gpu_gib;
  if (moe_) {
    line["aux_loss"] = r.aux_loss;
    for (const auto& [name, value] : r.aux_parts) line[name] = value;
    nlohmann::json loads = nlohmann::json::object();
    for (const auto& [site, l] : r.expert_loads) loads[site] = l;
    line["expert_load"] = loads;
  }
  write_line(line.dump());
  std::vector<std::pair<std::string, double>> scalars = {
      {"train/loss", r.loss}, {"train/lr", r.lr}, {"train/grad_norm", r.grad_norm},
      {"train/tokens_per_s", tps}};
  if (moe_) {
    scalars.emplace_back("train/aux_loss", r.aux_loss);
    for (const auto& [site, l] : r.expert_loads) {
      for (size_t e = 0; e < l.size(); ++e) {
        scalars.emplace_back("expert_load/" + site + "/" + std::to_string(e), l[e]);
      }
    }
  }
  write_scalars(scalars, done);
  window_start_ = Clock::now();
  window_tokens_ = 0;
}

void MetricsSink::on_eval(int64_t step, const EvalResult& e) {
  if (!lead_) return;
  summary_.eval_loss = e.loss;
  summary_.eval_accuracy = e.accuracy;
  spdlog::info("eval step {} | loss {:.4f} | accuracy {:.3f} over {} tokens", step, e.loss, e.accuracy, e.tokens);
  write_line(nlohmann::json{{"step", step}, {"eval_loss", e.loss}, {"eval_accuracy", e.accuracy}}.dump());
  write_scalars({{"eval/loss", e.loss}, {"eval/accuracy", e.accuracy}}, step);
}

void MetricsSink::write_line(const std::string& line) {
  if (!metrics_) return;
  try {
    metrics_->append_line(line);
  } catch (const Error& e) {
    metrics_.reset();
    log_failed("metrics.jsonl", e.what());
  }
}

void MetricsSink::write_scalars(const std::vector<std::pair<std::string, double>>& scalars,
                                int64_t step) {
  if (!tb_) return;
  try {
    for (const auto& [tag, value] : scalars) tb_->add_scalar(tag, step, value);
    tb_->flush();
  } catch (const Error& e) {
    tb_.reset();
    log_failed("the TensorBoard events", e.what());
  }
}

// A log that cannot be written is closed; training goes on, since the weights are worth more
// than the log, and the run ends with this error once the adapter is saved.
void MetricsSink::log_failed(const std::string& what, const std::string& error) {
  spdlog::error("{}; {} will not be written further, training goes on and the run will end with "
                "an error after the adapter is saved",
                error, what);
  if (log_error_.empty()) log_error_ = error;
}

TrainSummary MetricsSink::summary() const {
  TrainSummary s = summary_;
  s.wall_s = std::chrono::duration<double>(Clock::now() - start_).count();
  s.tokens_per_s = s.wall_s > 0 ? static_cast<double>(total_target_tokens_) / s.wall_s : 0.0;
  return s;
}

void MetricsSink::write_summary(const TrainSummary& s) const {
  if (!lead_) return;
  nlohmann::json done = {{"steps", s.steps}, {"skipped_steps", s.skipped_steps},
                         {"first_loss", s.first_loss}, {"last_loss", s.last_loss},
                         {"wall_s", s.wall_s}, {"target_tokens_per_s", s.tokens_per_s}};
  done["memory"] = {{"trainable_bytes", s.trainable_bytes}, {"grad_bytes", s.grad_bytes},
                    {"optimizer_bytes", s.optimizer_bytes}, {"base_bytes", s.base_bytes},
                    {"gathered_bytes", s.gathered_bytes}, {"peak_host_bytes", s.peak_host_bytes}};
  if (s.peak_device_bytes >= 0) done["memory"]["peak_device_bytes"] = s.peak_device_bytes;
  if (s.step_peak_bytes >= 0) {
    done["memory"]["step_peak_bytes"] = s.step_peak_bytes;
    done["memory"]["activation_bytes"] = s.activation_bytes;
  }
  if (!s.zero_groups.empty()) {
    nlohmann::json groups = nlohmann::json::array();
    for (const TrainSummary::ShardGroup& g : s.zero_groups) {
      groups.push_back({{"group", g.group}, {"bucket", g.bucket}, {"numel", g.numel},
                        {"ranks", g.ranks}, {"slice", g.slice}});
    }
    done["memory"]["groups"] = groups;
  }
  if (!std::isnan(s.eval_loss)) {
    done["eval_loss"] = s.eval_loss;
    done["eval_accuracy"] = s.eval_accuracy;
  }
  ckpt::write_file_atomic(config_.log.dir + "/summary.json", done.dump(2) + "\n");
}

}  // namespace mole::launch
