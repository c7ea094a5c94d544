// N sandboxes at once over one Runner, with a bounded queue: submit() blocks while the queue is full
// (backpressure), try_submit() says so instead.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <future>
#include <mutex>
#include <thread>
#include <vector>

#include "sandbox/sandbox.h"

namespace r1lab::sandbox {

struct PoolOptions {
  int workers = 0;          // sandboxes running at once; 0: the number of CPUs
  int queue_capacity = 0;   // jobs waiting at most; 0: 4 x workers
};

class Pool {
 public:
  using Future = std::future<absl::StatusOr<Result>>;
  Pool(const Runner& runner, PoolOptions options = {});
  ~Pool();  // finishes the queued jobs, then joins
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  Future submit(Program program, Limits limits, std::optional<std::string> expected = std::nullopt);
  // ResourceExhausted when the queue is full.
  absl::StatusOr<Future> try_submit(Program program, Limits limits, std::optional<std::string> expected = std::nullopt);

  int workers() const { return static_cast<int>(threads_.size()); }
  int queued() const;

 private:
  struct Job {
    Program program;
    Limits limits;
    std::optional<std::string> expected;
    std::promise<absl::StatusOr<Result>> done;
  };
  Future enqueue(Job job, std::unique_lock<std::mutex>& lock);
  void work();

  const Runner& runner_;
  size_t capacity_;
  mutable std::mutex mu_;
  std::condition_variable has_job_, has_room_;
  std::deque<Job> queue_;
  bool stopping_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace r1lab::sandbox
