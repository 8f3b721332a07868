// StartupDeadline: a watcher thread with a deadline (see startup_deadline.h).
#include "dist/startup_deadline.h"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "dist/runtime.h"

namespace mole::dist {

StartupDeadline::StartupDeadline(double timeout_s, std::string setting)
    : timeout_s_(timeout_s), setting_(std::move(setting)) {
  RankInfo rank;
  try {
    rank = detect_rank_info();
  } catch (...) {  // reported elsewhere; the message then says rank 0 of 1
  }
  char who[512];
  std::snprintf(who, sizeof who, "rank %d of %d on host %s (pid %d)", rank.rank, rank.world,
                host_name().c_str(), static_cast<int>(::getpid()));
  who_ = who;
  constexpr double kYear = 365.0 * 24 * 3600;
  if (timeout_s_ > 0 && timeout_s_ <= kYear) watcher_ = std::thread([this] { watch(); });
}

StartupDeadline::~StartupDeadline() { done(); }

void StartupDeadline::phase(std::string what) {
  std::lock_guard<std::mutex> lock(mutex_);
  phase_ = std::move(what);
}

void StartupDeadline::done() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    done_ = true;
  }
  changed_.notify_all();
  if (watcher_.joinable()) watcher_.join();
}

void StartupDeadline::watch() {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                            std::chrono::duration<double>(timeout_s_));
  std::unique_lock<std::mutex> lock(mutex_);
  if (changed_.wait_until(lock, deadline, [this] { return done_; })) return;
  std::fprintf(stderr,
               "mole: %s: start-up did not finish within %g s (%s) while %s; ending this rank. "
               "Causes met: a peer host that cannot be reached (a firewall, or MPI/Gloo using an "
               "interface the other hosts cannot reach: set btl_tcp_if_include and "
               "GLOO_SOCKET_IFNAME), two hosts with the same host name (Open MPI takes them for "
               "one node), a rank that never started.\n",
               who_.c_str(), timeout_s_, setting_.c_str(), phase_.c_str());
  std::fflush(stderr);
  std::_Exit(1);
}

}  // namespace mole::dist
