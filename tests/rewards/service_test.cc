// The reward service over gRPC on loopback, against the same rewards in process.
#include <algorithm>
#include "rewards/service.h"

#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "r1lab/v1/reward.grpc.pb.h"

namespace r1lab::rewards {
namespace {

class RewardServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto set = RewardSet::make(RewardRegistry::with_builtin_rules(), nlohmann::json::parse(R"({
        "r1_countdown": [{"name": "format", "weight": 0.1}, {"name": "countdown", "params": {"use_all": true}}]})"));
    ASSERT_TRUE(set.ok()) << set.status();
    set_ = std::make_shared<RewardSet>(std::move(*set));
    auto server = start_reward_server(set_, "127.0.0.1", 0);
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    target_ = "127.0.0.1:" + std::to_string(server_->port());
    remote_ = make_grpc_reward_client(target_);
    local_ = make_local_reward_client(set_);
  }

  static std::vector<Sample> samples() {
    const nlohmann::json meta = {{"numbers", {3, 7, 25}}, {"target", 46}};
    return {
        {"p", "<think>3*7=21, +25</think><answer>3 * 7 + 25</answer>", "", "countdown", meta},  // 1.1
        {"p", "<answer>3 * 7 + 25</answer>", "", "countdown", meta},                            // 1.0
        {"p", "<think>hm</think><answer>25 + 7</answer>", "", "countdown", meta},               // 0.1
        {"p", "<think>x</think><answer>1</answer>", "", "countdown", nullptr},                 // error
    };
  }

  std::shared_ptr<RewardSet> set_;
  std::unique_ptr<RewardServer> server_;
  std::string target_;
  std::unique_ptr<RewardClient> remote_, local_;
};

TEST_F(RewardServiceTest, GrpcAndInProcessScoresAgree) {
  auto r = remote_->score("r1_countdown", samples());
  auto l = local_->score("r1_countdown", samples());
  ASSERT_TRUE(r.ok() && l.ok()) << r.status() << l.status();
  ASSERT_EQ(r->size(), 4u);
  const double want[] = {1.1, 1.0, 0.1, 0.1};
  for (size_t i = 0; i < 4; ++i) {
    EXPECT_DOUBLE_EQ((*r)[i].value, want[i]) << i;
    EXPECT_EQ((*r)[i].value, (*l)[i].value);
    EXPECT_EQ((*r)[i].components, (*l)[i].components);
    EXPECT_EQ((*r)[i].error, (*l)[i].error);
  }
  EXPECT_EQ((*r)[0].components.at("format"), 1.0);
  EXPECT_EQ((*r)[0].components.at("countdown"), 1.0);
  EXPECT_FALSE((*r)[3].error.empty());
  auto list = remote_->list();
  ASSERT_TRUE(list.ok());
  std::vector<std::string> names;
  for (const RewardInfo& i : *list) names.push_back(i.name);
  for (const char* name : {"answer_match", "countdown", "format", "math", "r1_countdown"})
    EXPECT_NE(std::find(names.begin(), names.end(), name), names.end()) << name;
  auto empty = remote_->score("format", {});
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->empty());
}

TEST_F(RewardServiceTest, BadRequestsGetInvalidArgumentAndTheServerKeepsServing) {
  EXPECT_EQ(remote_->score("no_such_reward", samples()).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<Sample> bad = samples();
  bad[1].completion = "<answer>\xff\xfe</answer>";
  auto st = remote_->score("format", bad).status();
  EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(st.message().find("sample 1: completion is not UTF-8"), std::string::npos) << st;
  bad = samples();
  bad[0].prompt = "\xed\xa0\x80";  // a UTF-16 surrogate
  EXPECT_EQ(remote_->score("format", bad).status().code(), absl::StatusCode::kInvalidArgument);
  bad = samples();
  bad[2].completion = std::string((1 << 20) + 1, 'a');
  EXPECT_EQ(remote_->score("format", bad).status().code(), absl::StatusCode::kInvalidArgument);
  // Raw requests: metadata that is not a JSON object.
  auto stub = v1::Reward::NewStub(grpc::CreateChannel(target_, grpc::InsecureChannelCredentials()));
  for (const char* meta : {"[1, 2]", "{not json", "42"}) {
    v1::ScoreRequest req;
    req.set_reward("countdown");
    req.add_samples()->set_meta_json(meta);
    v1::ScoreResponse resp;
    grpc::ClientContext ctx;
    EXPECT_EQ(stub->Score(&ctx, req, &resp).error_code(), grpc::StatusCode::INVALID_ARGUMENT) << meta;
  }
  // Still serving.
  auto ok = remote_->score("r1_countdown", samples());
  ASSERT_TRUE(ok.ok());
  EXPECT_DOUBLE_EQ((*ok)[0].value, 1.1);
}

TEST(RewardSet, RejectsBadSpecs) {
  const RewardRegistry reg = RewardRegistry::with_builtin_rules();
  EXPECT_FALSE(RewardSet::make(reg, nlohmann::json::parse(R"({"x": [{"name": "nope"}]})")).ok());
  EXPECT_FALSE(RewardSet::make(reg, nlohmann::json::parse(R"([1])")).ok());
  EXPECT_FALSE(RewardSet::make(reg, nlohmann::json::parse(R"({"x": []})")).ok());
  auto plain = RewardSet::make(reg, nullptr);
  ASSERT_TRUE(plain.ok());
  EXPECT_NE(plain->find("format"), nullptr);
  EXPECT_EQ(plain->find("r1_countdown"), nullptr);
}

}  // namespace
}  // namespace r1lab::rewards
