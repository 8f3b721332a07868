// Collective work in the background: jobs run one after another, in the order they are
// submitted, on a thread of their own and a communicator of their own (split from the group they
// serve, so that their collectives never interleave with the caller's on the group itself). Every
// rank submits the same jobs in the same order. ZeRO-2's gradient reduce-scatters during backward
// and asynchronous checkpoint saves run on one.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

namespace mole::dist {

class Communicator;

class CollectiveStream {
 public:
  // A job gets the stream's communicator (null when the stream has none: one process).
  using Job = std::function<void(Communicator*)>;

  explicit CollectiveStream(std::unique_ptr<Communicator> comm);
  // Finishes the job in flight (its collectives are bounded by the communicator's timeout) and
  // drops the queued ones: only an error leaves any, and the peers are not waiting for them.
  ~CollectiveStream();
  CollectiveStream(const CollectiveStream&) = delete;
  CollectiveStream& operator=(const CollectiveStream&) = delete;

  void submit(Job job);
  // Waits until every submitted job has run; rethrows the first error (once). After an error the
  // jobs queued behind it are dropped.
  void drain();

 private:
  void run();

  std::unique_ptr<Communicator> comm_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Job> queue_;
  int64_t pending_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
  std::thread thread_;  // last: started once the rest is built
};

}  // namespace mole::dist
