#include "sandbox/pool.h"

#include "absl/strings/str_cat.h"

namespace r1lab::sandbox {

Pool::Pool(const Runner& runner, PoolOptions options) : runner_(runner) {
  int n = options.workers > 0 ? options.workers : static_cast<int>(std::thread::hardware_concurrency());
  n = std::max(n, 1);
  capacity_ = static_cast<size_t>(options.queue_capacity > 0 ? options.queue_capacity : 4 * n);
  for (int i = 0; i < n; ++i) threads_.emplace_back([this] { work(); });
}

Pool::~Pool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stopping_ = true;
  }
  has_job_.notify_all();
  for (auto& t : threads_) t.join();
}

int Pool::queued() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int>(queue_.size());
}

Pool::Future Pool::enqueue(Job job, std::unique_lock<std::mutex>& lock) {
  Future f = job.done.get_future();
  queue_.push_back(std::move(job));
  lock.unlock();
  has_job_.notify_one();
  return f;
}

Pool::Future Pool::submit(Program program, Limits limits, std::optional<std::string> expected) {
  std::unique_lock<std::mutex> lock(mu_);
  has_room_.wait(lock, [&] { return queue_.size() < capacity_; });
  return enqueue(Job{std::move(program), limits, std::move(expected), {}}, lock);
}

absl::StatusOr<Pool::Future> Pool::try_submit(Program program, Limits limits, std::optional<std::string> expected) {
  std::unique_lock<std::mutex> lock(mu_);
  if (queue_.size() >= capacity_)
    return absl::ResourceExhaustedError(absl::StrCat("the sandbox queue is full (", capacity_, " jobs waiting)"));
  return enqueue(Job{std::move(program), limits, std::move(expected), {}}, lock);
}

void Pool::work() {
  for (;;) {
    std::unique_lock<std::mutex> lock(mu_);
    has_job_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
    if (queue_.empty()) return;  // stopping, and nothing left to do
    Job job = std::move(queue_.front());
    queue_.pop_front();
    lock.unlock();
    has_room_.notify_one();
    job.done.set_value(runner_.run(job.program, job.limits, job.expected));
  }
}

}  // namespace r1lab::sandbox
