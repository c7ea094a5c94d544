// The run store: one SQLite file per run (WAL journal, so `r1lab report` can read while the run writes,
// and a crash loses at most the step being written). Tables:
//   run(key, value)                        name, recipe (JSON), status, message, start/end times
//   stages(name, started, finished, status)
//   metrics(stage, step, name, value)      one row per number: reward_mean, accuracy, kl, ...
//   samples(stage, step, idx, prompt, completion, reference, reward, correct)
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

struct sqlite3;

namespace r1lab::run {

struct MetricRow {
  std::string stage;
  int64_t step = 0;
  std::string name;
  double value = 0;
};

struct SampleRow {
  std::string prompt, completion, reference;
  double reward = 0;
  bool correct = false;
};

struct StageRow {
  std::string name, status;
  double started = 0, finished = 0;  // unix seconds; finished 0 while running
};

class RunStore {
 public:
  // Creates a new store (fails if the file exists) and records the run's name and recipe.
  static absl::StatusOr<std::unique_ptr<RunStore>> create(const std::string& path, const std::string& name,
                                                          const std::string& recipe_json);
  // Opens an existing store (read and write).
  static absl::StatusOr<std::unique_ptr<RunStore>> open(const std::string& path);
  ~RunStore();

  const std::string& path() const { return path_; }
  absl::Status set(const std::string& key, const std::string& value);
  absl::StatusOr<std::string> get(const std::string& key) const;  // NOT_FOUND when absent

  absl::Status begin_stage(const std::string& stage);
  absl::Status end_stage(const std::string& stage, const std::string& status);
  absl::Status log_metrics(const std::string& stage, int64_t step, const std::map<std::string, double>& values);
  absl::Status log_samples(const std::string& stage, int64_t step, const std::vector<SampleRow>& samples);

  absl::StatusOr<std::vector<StageRow>> stages() const;
  // Every metric row, ordered by stage start, step, name.
  absl::StatusOr<std::vector<MetricRow>> metrics() const;
  absl::StatusOr<std::vector<SampleRow>> samples(const std::string& stage, int64_t step) const;

 private:
  RunStore(std::string path, sqlite3* db) : path_(std::move(path)), db_(db) {}
  absl::Status exec(const std::string& sql);
  std::string path_;
  sqlite3* db_;
};

double unix_seconds();

}  // namespace r1lab::run
