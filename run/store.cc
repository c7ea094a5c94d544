#include "run/store.h"

#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "sqlite3.h"

namespace r1lab::run {
namespace {

constexpr char kSchema[] = R"sql(
PRAGMA journal_mode=WAL;
PRAGMA synchronous=NORMAL;
CREATE TABLE IF NOT EXISTS run(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS stages(name TEXT PRIMARY KEY, started REAL NOT NULL, finished REAL NOT NULL DEFAULT 0,
                                  status TEXT NOT NULL DEFAULT 'running');
CREATE TABLE IF NOT EXISTS metrics(stage TEXT NOT NULL, step INTEGER NOT NULL, name TEXT NOT NULL, value REAL,
                                   PRIMARY KEY(stage, step, name));
CREATE TABLE IF NOT EXISTS samples(stage TEXT NOT NULL, step INTEGER NOT NULL, idx INTEGER NOT NULL, prompt TEXT,
                                   completion TEXT, reference TEXT, reward REAL, correct INTEGER,
                                   PRIMARY KEY(stage, step, idx));
)sql";

// A prepared statement, finalized on scope exit.
class Stmt {
 public:
  Stmt(sqlite3* db, const char* sql) : db_(db) { rc_ = sqlite3_prepare_v2(db, sql, -1, &s_, nullptr); }
  ~Stmt() { sqlite3_finalize(s_); }
  absl::Status ok() const {
    return rc_ == SQLITE_OK ? absl::OkStatus() : absl::InternalError(absl::StrCat("sqlite: ", sqlite3_errmsg(db_)));
  }
  Stmt& text(int i, const std::string& v) {
    sqlite3_bind_text(s_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
    return *this;
  }
  Stmt& real(int i, double v) {
    sqlite3_bind_double(s_, i, v);
    return *this;
  }
  Stmt& integer(int i, int64_t v) {
    sqlite3_bind_int64(s_, i, v);
    return *this;
  }
  // SQLITE_ROW, SQLITE_DONE, or an error code.
  int step() { return sqlite3_step(s_); }
  absl::Status run() {
    const int rc = step();
    sqlite3_reset(s_);
    sqlite3_clear_bindings(s_);
    return rc == SQLITE_DONE ? absl::OkStatus() : absl::InternalError(absl::StrCat("sqlite: ", sqlite3_errmsg(db_)));
  }
  std::string col_text(int i) const {
    const unsigned char* t = sqlite3_column_text(s_, i);
    return t ? std::string(reinterpret_cast<const char*>(t), static_cast<size_t>(sqlite3_column_bytes(s_, i))) : "";
  }
  double col_real(int i) const { return sqlite3_column_double(s_, i); }
  int64_t col_int(int i) const { return sqlite3_column_int64(s_, i); }
  absl::Status error() const { return absl::InternalError(absl::StrCat("sqlite: ", sqlite3_errmsg(db_))); }

 private:
  sqlite3* db_;
  sqlite3_stmt* s_ = nullptr;
  int rc_;
};

absl::StatusOr<sqlite3*> open_db(const std::string& path, int flags) {
  sqlite3* db = nullptr;
  if (sqlite3_open_v2(path.c_str(), &db, flags, nullptr) != SQLITE_OK) {
    std::string msg = db ? sqlite3_errmsg(db) : "out of memory";
    sqlite3_close(db);
    return absl::InternalError(absl::StrCat("cannot open run store ", path, ": ", msg));
  }
  sqlite3_busy_timeout(db, 5000);
  return db;
}

}  // namespace

double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

absl::StatusOr<std::unique_ptr<RunStore>> RunStore::create(const std::string& path, const std::string& name,
                                                           const std::string& recipe_json) {
  if (std::filesystem::exists(path)) return absl::AlreadyExistsError(absl::StrCat("run store ", path, " already exists"));
  std::error_code ec;
  const auto parent = std::filesystem::path(path).parent_path();
  if (!parent.empty()) std::filesystem::create_directories(parent, ec);
  auto db = open_db(path, SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE);
  if (!db.ok()) return db.status();
  std::unique_ptr<RunStore> s(new RunStore(path, *db));
  if (auto st = s->exec(kSchema); !st.ok()) return st;
  for (const auto& [k, v] : {std::pair<std::string, std::string>{"name", name}, {"recipe", recipe_json},
                             {"status", "running"}, {"started", absl::StrFormat("%.3f", unix_seconds())}})
    if (auto st = s->set(k, v); !st.ok()) return st;
  return s;
}

absl::StatusOr<std::unique_ptr<RunStore>> RunStore::open(const std::string& path) {
  if (!std::filesystem::exists(path)) return absl::NotFoundError(absl::StrCat("no run store at ", path));
  auto db = open_db(path, SQLITE_OPEN_READWRITE);
  if (!db.ok()) return db.status();
  std::unique_ptr<RunStore> s(new RunStore(path, *db));
  Stmt q(*db, "SELECT value FROM run WHERE key = 'name'");
  if (!q.ok().ok() || q.step() != SQLITE_ROW)
    return absl::InvalidArgumentError(absl::StrCat(path, " is not an r1lab run store"));
  return s;
}

RunStore::~RunStore() { sqlite3_close(db_); }

absl::Status RunStore::exec(const std::string& sql) {
  char* err = nullptr;
  if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &err) != SQLITE_OK) {
    std::string msg = err ? err : "unknown error";
    sqlite3_free(err);
    return absl::InternalError(absl::StrCat("sqlite (", path_, "): ", msg));
  }
  return absl::OkStatus();
}

absl::Status RunStore::set(const std::string& key, const std::string& value) {
  Stmt s(db_, "INSERT INTO run(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value");
  if (auto st = s.ok(); !st.ok()) return st;
  return s.text(1, key).text(2, value).run();
}

absl::StatusOr<std::string> RunStore::get(const std::string& key) const {
  Stmt s(db_, "SELECT value FROM run WHERE key = ?");
  if (auto st = s.ok(); !st.ok()) return st;
  s.text(1, key);
  const int rc = s.step();
  if (rc == SQLITE_ROW) return s.col_text(0);
  if (rc == SQLITE_DONE) return absl::NotFoundError(absl::StrCat("run store: no '", key, "'"));
  return s.error();
}

absl::Status RunStore::begin_stage(const std::string& stage) {
  Stmt s(db_, "INSERT INTO stages(name, started) VALUES(?, ?) ON CONFLICT(name) DO UPDATE SET "
              "started = excluded.started, finished = 0, status = 'running'");
  if (auto st = s.ok(); !st.ok()) return st;
  return s.text(1, stage).real(2, unix_seconds()).run();
}

absl::Status RunStore::end_stage(const std::string& stage, const std::string& status) {
  Stmt s(db_, "UPDATE stages SET finished = ?, status = ? WHERE name = ?");
  if (auto st = s.ok(); !st.ok()) return st;
  return s.real(1, unix_seconds()).text(2, status).text(3, stage).run();
}

absl::Status RunStore::log_metrics(const std::string& stage, int64_t step, const std::map<std::string, double>& values) {
  if (auto st = exec("BEGIN"); !st.ok()) return st;
  Stmt s(db_, "INSERT OR REPLACE INTO metrics(stage, step, name, value) VALUES(?, ?, ?, ?)");
  absl::Status st = s.ok();
  for (const auto& [name, value] : values) {
    if (!st.ok()) break;
    st = s.text(1, stage).integer(2, step).text(3, name).real(4, value).run();
  }
  if (!st.ok()) {
    (void)exec("ROLLBACK");
    return st;
  }
  return exec("COMMIT");
}

absl::Status RunStore::log_samples(const std::string& stage, int64_t step, const std::vector<SampleRow>& samples) {
  if (auto st = exec("BEGIN"); !st.ok()) return st;
  Stmt s(db_, "INSERT OR REPLACE INTO samples(stage, step, idx, prompt, completion, reference, reward, correct) "
              "VALUES(?, ?, ?, ?, ?, ?, ?, ?)");
  absl::Status st = s.ok();
  for (size_t i = 0; i < samples.size() && st.ok(); ++i) {
    const SampleRow& r = samples[i];
    st = s.text(1, stage).integer(2, step).integer(3, static_cast<int64_t>(i)).text(4, r.prompt).text(5, r.completion)
             .text(6, r.reference).real(7, r.reward).integer(8, r.correct).run();
  }
  if (!st.ok()) {
    (void)exec("ROLLBACK");
    return st;
  }
  return exec("COMMIT");
}

absl::StatusOr<std::vector<StageRow>> RunStore::stages() const {
  Stmt s(db_, "SELECT name, started, finished, status FROM stages ORDER BY started");
  if (auto st = s.ok(); !st.ok()) return st;
  std::vector<StageRow> out;
  int rc;
  while ((rc = s.step()) == SQLITE_ROW) out.push_back({s.col_text(0), s.col_text(3), s.col_real(1), s.col_real(2)});
  if (rc != SQLITE_DONE) return s.error();
  return out;
}

absl::StatusOr<std::vector<MetricRow>> RunStore::metrics() const {
  Stmt s(db_, "SELECT m.stage, m.step, m.name, m.value FROM metrics m LEFT JOIN stages g ON g.name = m.stage "
              "ORDER BY g.started, m.step, m.name");
  if (auto st = s.ok(); !st.ok()) return st;
  std::vector<MetricRow> out;
  int rc;
  while ((rc = s.step()) == SQLITE_ROW) out.push_back({s.col_text(0), s.col_int(1), s.col_text(2), s.col_real(3)});
  if (rc != SQLITE_DONE) return s.error();
  return out;
}

absl::StatusOr<std::vector<SampleRow>> RunStore::samples(const std::string& stage, int64_t step) const {
  Stmt s(db_, "SELECT prompt, completion, reference, reward, correct FROM samples WHERE stage = ? AND step = ? ORDER BY idx");
  if (auto st = s.ok(); !st.ok()) return st;
  s.text(1, stage).integer(2, step);
  std::vector<SampleRow> out;
  int rc;
  while ((rc = s.step()) == SQLITE_ROW)
    out.push_back({s.col_text(0), s.col_text(1), s.col_text(2), s.col_real(3), s.col_int(4) != 0});
  if (rc != SQLITE_DONE) return s.error();
  return out;
}

}  // namespace r1lab::run
