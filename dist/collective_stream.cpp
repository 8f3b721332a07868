// A thread running collective jobs in order (see collective_stream.h).
#include "dist/collective_stream.h"

#include <ATen/core/grad_mode.h>

#include <utility>

#include "dist/communicator.h"

namespace mole::dist {

CollectiveStream::CollectiveStream(std::unique_ptr<Communicator> comm)
    : comm_(std::move(comm)), thread_([this] { run(); }) {}

CollectiveStream::~CollectiveStream() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void CollectiveStream::submit(Job job) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    queue_.push_back(std::move(job));
    ++pending_;
  }
  cv_.notify_all();
}

void CollectiveStream::drain() {
  std::unique_lock<std::mutex> lock(mutex_);
  cv_.wait(lock, [this] { return pending_ == 0; });
  if (error_) {
    std::exception_ptr e = error_;
    error_ = nullptr;
    std::rethrow_exception(e);
  }
}

void CollectiveStream::run() {
  at::NoGradGuard no_grad;
  for (;;) {
    Job job;
    bool failed;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_) return;
      job = std::move(queue_.front());
      queue_.pop_front();
      failed = error_ != nullptr;
    }
    if (!failed) {
      try {
        job(comm_.get());
      } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        error_ = std::current_exception();
      }
    }
    job = nullptr;  // what it holds (gradients, a snapshot) goes before the next wait
    {
      std::lock_guard<std::mutex> lock(mutex_);
      --pending_;
    }
    cv_.notify_all();
  }
}

}  // namespace mole::dist
