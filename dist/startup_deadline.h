// A deadline for start-up: the calls that bring a job up (MPI_Init, communicator creation, the
// Gloo rendezvous) block without a timeout of their own, and a peer that cannot be reached leaves
// them waiting forever with nothing printed. StartupDeadline ends the process with a message if
// start-up is not over in time.
#pragma once

#include <condition_variable>
#include <mutex>
#include <string>
#include <thread>

namespace mole::dist {

class StartupDeadline {
 public:
  // Starts watching: unless done() is called within `timeout_s` seconds, a watcher thread prints
  // "mole: rank R of W on host H (pid P): start-up did not finish within T s (`setting`) while
  // <phase>" and the causes met in practice to stderr, and ends the process with status 1 (the
  // launcher then ends the job). The rank comes from the launcher's environment, read here (not
  // on the watcher thread: MPI_Init may change the environment). A timeout that is not finite or
  // above a year sets no deadline.
  StartupDeadline(double timeout_s, std::string setting);
  ~StartupDeadline();  // done()
  StartupDeadline(const StartupDeadline&) = delete;
  StartupDeadline& operator=(const StartupDeadline&) = delete;

  // What start-up is doing now ("MPI_Init", "the Gloo rendezvous"), named in the message.
  void phase(std::string what);
  // Start-up is over: stops the watcher. Idempotent.
  void done();

 private:
  void watch();

  double timeout_s_;
  std::string setting_;
  std::string who_;  // "rank R of W on host H (pid P)"
  std::mutex mutex_;
  std::condition_variable changed_;
  std::string phase_ = "starting";
  bool done_ = false;
  std::thread watcher_;
};

}  // namespace mole::dist
