// StartupDeadline: a watcher thread with a deadline (see startup_deadline.h).
#include "dist/startup_deadline.h"

#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <utility>

#include "dist/runtime.h"

namespace mole::dist {

StartupDeadline::StartupDeadline(double timeout_s, std::string setting)
    : timeout_s_(timeout_s), setting_(std::move(setting)) {
  if (timeout_s_ > 0 && std::isfinite(timeout_s_)) watcher_ = std::thread([this] { watch(); });
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
  RankInfo who;
  try {
    who = detect_rank_info();
  } catch (...) {  // the launcher's variables were checked at start; keep rank 0 of 1 otherwise
  }
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  std::fprintf(stderr,
               "mole: rank %d of %d on host %s (pid %d): start-up did not finish within %g s (%s) "
               "while %s; ending this rank. Causes met: a peer host that cannot be reached (a "
               "firewall, or MPI/Gloo using an interface the other hosts cannot reach: set "
               "btl_tcp_if_include and GLOO_SOCKET_IFNAME), two hosts with the same host name "
               "(Open MPI takes them for one node), a rank that never started.\n",
               who.rank, who.world, host, static_cast<int>(::getpid()), timeout_s_,
               setting_.c_str(), phase_.c_str());
  std::fflush(stderr);
  std::_Exit(1);
}

}  // namespace mole::dist
