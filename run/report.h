// `r1lab report RUN_DB`: a run's summary as text (status, stages, held-out accuracy, a table of RL
// steps, the time split) and PNG line plots (cairo) of reward, accuracy and response length over steps.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace r1lab::run {

struct Series {
  std::string label;
  std::vector<double> x, y;
  bool points = false;  // markers instead of a line
};
// Writes a line chart to a PNG file.
absl::Status plot_png(const std::string& path, const std::string& title, const std::string& x_label,
                      const std::vector<Series>& series);

// The summary text; writes reward.png, accuracy.png and response_length.png into plots_dir (default:
// the store's directory). Works on a running store too (WAL readers do not block the writer).
absl::StatusOr<std::string> report(const std::string& store_path, const std::string& plots_dir = "");

}  // namespace r1lab::run
