#include "run/report.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <map>

#include <cairo.h>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "run/store.h"

namespace r1lab::run {
namespace {

// 1, 2, 5 × 10^k steps giving about `n` ticks over [lo, hi].
double nice_step(double lo, double hi, int n) {
  const double raw = (hi - lo) / std::max(n, 1);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0, 10.0})
    if (raw <= m * mag) return m * mag;
  return 10 * mag;
}

std::string tick_label(double v, double step) {
  if (step >= 1) return absl::StrFormat("%.0f", v);
  const int decimals = static_cast<int>(std::ceil(-std::log10(step)));
  return absl::StrFormat("%.*f", decimals, v);
}

}  // namespace

absl::Status plot_png(const std::string& path, const std::string& title, const std::string& x_label,
                      const std::vector<Series>& series) {
  const int w = 720, h = 420;
  const double left = 70, right = 20, top = 40, bottom = 55;
  double x0 = 1e300, x1 = -1e300, y0 = 1e300, y1 = -1e300;
  for (const Series& s : series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      x0 = std::min(x0, s.x[i]);
      x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, s.y[i]);
      y1 = std::max(y1, s.y[i]);
    }
  if (x0 > x1) x0 = 0, x1 = 1, y0 = 0, y1 = 1;
  if (x1 == x0) x1 = x0 + 1;
  if (y1 == y0) y0 -= 0.5, y1 += 0.5;
  const double pad = 0.05 * (y1 - y0);
  y0 -= pad;
  y1 += pad;
  cairo_surface_t* surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, w, h);
  cairo_t* cr = cairo_create(surface);
  auto X = [&](double x) { return left + (x - x0) / (x1 - x0) * (w - left - right); };
  auto Y = [&](double y) { return h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom); };
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  cairo_select_font_face(cr, "DejaVu Sans", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  // Grid and ticks.
  cairo_set_font_size(cr, 11);
  cairo_set_line_width(cr, 1);
  const double ys = nice_step(y0, y1, 6), xs = nice_step(x0, x1, 8);
  for (double y = std::ceil(y0 / ys) * ys; y <= y1 + 1e-12; y += ys) {
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, left, Y(y));
    cairo_line_to(cr, w - right, Y(y));
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0.2, 0.2, 0.2);
    const std::string t = tick_label(y, ys);
    cairo_text_extents_t e;
    cairo_text_extents(cr, t.c_str(), &e);
    cairo_move_to(cr, left - 6 - e.width, Y(y) + e.height / 2);
    cairo_show_text(cr, t.c_str());
  }
  for (double x = std::ceil(x0 / xs) * xs; x <= x1 + 1e-12; x += xs) {
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, X(x), top);
    cairo_line_to(cr, X(x), h - bottom);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0.2, 0.2, 0.2);
    const std::string t = tick_label(x, xs);
    cairo_text_extents_t e;
    cairo_text_extents(cr, t.c_str(), &e);
    cairo_move_to(cr, X(x) - e.width / 2, h - bottom + 16);
    cairo_show_text(cr, t.c_str());
  }
  cairo_set_source_rgb(cr, 0.3, 0.3, 0.3);
  cairo_rectangle(cr, left, top, w - left - right, h - top - bottom);
  cairo_stroke(cr);
  // Titles.
  cairo_set_source_rgb(cr, 0, 0, 0);
  cairo_set_font_size(cr, 15);
  cairo_move_to(cr, left, 25);
  cairo_show_text(cr, title.c_str());
  cairo_set_font_size(cr, 12);
  cairo_text_extents_t e;
  cairo_text_extents(cr, x_label.c_str(), &e);
  cairo_move_to(cr, left + (w - left - right - e.width) / 2, h - 18);
  cairo_show_text(cr, x_label.c_str());
  // Series and legend.
  static const double colors[][3] = {{0.12, 0.47, 0.71}, {0.85, 0.37, 0.01}, {0.17, 0.63, 0.17}, {0.84, 0.15, 0.16}};
  double legend_x = left + 10;
  for (size_t k = 0; k < series.size(); ++k) {
    const Series& s = series[k];
    const double* c = colors[k % 4];
    cairo_set_source_rgb(cr, c[0], c[1], c[2]);
    cairo_set_line_width(cr, 2);
    if (s.points) {
      for (size_t i = 0; i < s.x.size(); ++i) {
        cairo_arc(cr, X(s.x[i]), Y(s.y[i]), 4, 0, 2 * M_PI);
        cairo_fill(cr);
      }
    } else {
      for (size_t i = 0; i < s.x.size(); ++i) (i ? cairo_line_to : cairo_move_to)(cr, X(s.x[i]), Y(s.y[i]));
      cairo_stroke(cr);
    }
    cairo_rectangle(cr, legend_x, top + 8, 12, 4);
    cairo_fill(cr);
    cairo_set_source_rgb(cr, 0.1, 0.1, 0.1);
    cairo_set_font_size(cr, 11);
    cairo_move_to(cr, legend_x + 16, top + 14);
    cairo_show_text(cr, s.label.c_str());
    cairo_text_extents(cr, s.label.c_str(), &e);
    legend_x += 30 + e.width;
  }
  cairo_destroy(cr);
  const cairo_status_t st = cairo_surface_write_to_png(surface, path.c_str());
  cairo_surface_destroy(surface);
  if (st != CAIRO_STATUS_SUCCESS)
    return absl::InternalError(absl::StrCat("cannot write ", path, ": ", cairo_status_to_string(st)));
  return absl::OkStatus();
}

absl::StatusOr<std::string> report(const std::string& store_path, const std::string& plots_dir_in) {
  auto store = RunStore::open(store_path);
  if (!store.ok()) return store.status();
  auto stages = (*store)->stages();
  if (!stages.ok()) return stages.status();
  auto metrics = (*store)->metrics();
  if (!metrics.ok()) return metrics.status();
  auto value = [&](const std::string& k) {
    auto v = (*store)->get(k);
    return v.ok() ? *v : std::string();
  };
  std::string out = absl::StrFormat("run %s: %s%s\n", value("name"), value("status"),
                                    value("message").empty() ? "" : absl::StrCat(" (", value("message"), ")"));
  absl::StrAppend(&out, absl::StrFormat("%-15s %-12s %10s\n", "stage", "status", "seconds"));
  for (const StageRow& s : *stages)
    absl::StrAppend(&out, absl::StrFormat("%-15s %-12s %10.1f\n", s.name, s.status,
                                          (s.finished > 0 ? s.finished : unix_seconds()) - s.started));
  // stage -> name -> step -> value
  std::map<std::string, std::map<std::string, std::map<int64_t, double>>> by;
  for (const MetricRow& m : *metrics) by[m.stage][m.name][m.step] = m.value;
  const auto& eval = by["eval"];
  if (eval.count("accuracy")) {
    const auto& acc = eval.at("accuracy");
    absl::StrAppend(&out, "\nheld-out accuracy:");
    for (const auto& [step, v] : acc) absl::StrAppend(&out, absl::StrFormat(" step %lld %.1f%%", static_cast<long long>(step), 100 * v));
    absl::StrAppend(&out, "\n");
  }
  const auto& rl = by["rl"];
  if (rl.count("reward_mean")) {
    const auto& reward = rl.at("reward_mean");
    const int64_t last = reward.rbegin()->first;
    const int64_t every = std::max<int64_t>(1, last / 10);
    // lp gap: the largest |trainer - sampler| logprob of the step's tokens, before the update.
    absl::StrAppend(&out, absl::StrFormat("\n%6s %8s %8s %8s %8s %9s %8s %7s %8s %8s %8s\n", "step", "reward", "acc",
                                          "format", "length", "kl", "entropy", "clip", "lp gap", "grad", "s/step"));
    auto get = [&](const char* name, int64_t step) {
      auto it = rl.find(name);
      if (it == rl.end()) return std::nan("");
      auto jt = it->second.find(step);
      return jt == it->second.end() ? std::nan("") : jt->second;
    };
    for (const auto& [step, r] : reward) {
      if (step % every && step != last && step != 1) continue;
      absl::StrAppend(&out, absl::StrFormat("%6lld %8.3f %7.1f%% %7.1f%% %8.1f %9.5f %8.3f %7.3f %8.2g %8.3f %8.2f\n",
                                            static_cast<long long>(step), r, 100 * get("accuracy", step),
                                            100 * get("format_rate", step), get("response_length", step), get("kl", step),
                                            get("entropy", step), get("clip_fraction", step),
                                            get("logprob_gap_max", step), get("grad_norm", step),
                                            get("step_seconds", step)));
    }
    // The trend in one line: mean reward over the first and the last tenth of the steps (10 at least).
    const size_t n = reward.size(), k = std::min(n, std::max<size_t>(10, n / 10));
    double first = 0, last_mean = 0;
    size_t i = 0;
    for (const auto& [step, r] : reward) {
      if (i < k) first += r / static_cast<double>(k);
      if (i >= n - k) last_mean += r / static_cast<double>(k);
      ++i;
    }
    absl::StrAppend(&out, absl::StrFormat("\nmean reward: first %zu steps %.3f, last %zu steps %.3f\n", k, first, k, last_mean));
    double sums[5] = {0, 0, 0, 0, 0};
    const char* parts[5] = {"rollout_seconds", "reward_seconds", "train_seconds", "sync_seconds", "step_seconds"};
    for (int k = 0; k < 5; ++k)
      if (rl.count(parts[k]))
        for (const auto& [step, v] : rl.at(parts[k])) sums[k] += v;
    if (sums[4] > 0)
      absl::StrAppend(&out, absl::StrFormat("\nRL time: %.1fs = rollout %.1fs (%.0f%%) + reward %.1fs (%.0f%%) + train %.1fs "
                                            "(%.0f%%) + weight sync %.1fs (%.0f%%)\n",
                                            sums[4], sums[0], 100 * sums[0] / sums[4], sums[1], 100 * sums[1] / sums[4],
                                            sums[2], 100 * sums[2] / sums[4], sums[3], 100 * sums[3] / sums[4]));
  }
  const std::string seconds = value("seconds");
  if (!seconds.empty()) absl::StrAppend(&out, "whole run (seconds): ", seconds, "\n");

  // Plots.
  std::filesystem::path dir_path = plots_dir_in.empty() ? std::filesystem::path(store_path).parent_path()
                                                       : std::filesystem::path(plots_dir_in);
  if (dir_path.empty()) dir_path = std::filesystem::current_path();
  const std::string dir = dir_path.string();
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  auto series = [&](const std::string& stage, const std::string& name, const std::string& label, bool points = false) {
    Series s;
    s.label = label;
    s.points = points;
    if (by.count(stage) && by[stage].count(name))
      for (const auto& [step, v] : by[stage][name]) {
        s.x.push_back(static_cast<double>(step));
        s.y.push_back(v);
      }
    return s;
  };
  std::vector<std::string> written;
  auto draw = [&](const std::string& file, const std::string& title, std::vector<Series> s) -> absl::Status {
    s.erase(std::remove_if(s.begin(), s.end(), [](const Series& x) { return x.x.empty(); }), s.end());
    if (s.empty()) return absl::OkStatus();
    const std::string path = dir + "/" + file;
    if (auto st = plot_png(path, title, "RL step", s); !st.ok()) return st;
    written.push_back(path);
    return absl::OkStatus();
  };
  if (auto st = draw("reward.png", "reward (mean over the step's samples)", {series("rl", "reward_mean", "reward")}); !st.ok())
    return st;
  if (auto st = draw("accuracy.png", "accuracy",
                     {series("rl", "accuracy", "training samples"), series("eval", "accuracy", "held-out", true)});
      !st.ok())
    return st;
  if (auto st = draw("response_length.png", "response length (tokens)", {series("rl", "response_length", "length")}); !st.ok())
    return st;
  if (!written.empty()) {
    absl::StrAppend(&out, "plots:");
    for (const auto& p : written) absl::StrAppend(&out, " ", p);
    absl::StrAppend(&out, "\n");
  }
  return out;
}

}  // namespace r1lab::run
