#include "rollout/block_manager.h"

#include "gtest/gtest.h"

namespace r1lab::rollout {
namespace {

TEST(BlockManager, AllocatesUntilFullAndFreesOnLastRelease) {
  BlockManager m(3, 4);
  auto a = m.allocate(), b = m.allocate(), c = m.allocate();
  ASSERT_TRUE(a && b && c);
  EXPECT_FALSE(m.allocate().has_value());
  m.retain(*a);
  m.release(*a);
  EXPECT_EQ(m.num_available(), 0);
  m.release(*a);
  EXPECT_EQ(m.num_available(), 1);
  EXPECT_EQ(m.allocate(), a);
  m.release(*a);
  m.release(*b);
  m.release(*c);
  EXPECT_EQ(m.num_in_use(), 0);
}

TEST(BlockManager, CachedBlocksAreFoundByContentAndEvictedLeastRecentlyUsedFirst) {
  BlockManager m(2, 2);
  const int32_t t1[2] = {1, 2}, t2[2] = {3, 4};
  const uint64_t h1 = BlockManager::hash_block(0, t1, 2), h2 = BlockManager::hash_block(h1, t2, 2);
  auto a = *m.allocate(), b = *m.allocate();
  m.publish(a, h1, 0, t1);
  m.publish(b, h2, h1, t2);
  m.release(a);
  m.release(b);
  EXPECT_EQ(m.num_available(), 2);
  EXPECT_EQ(m.num_cached(), 2);
  // Found while unused: retained again, so not evictable.
  EXPECT_EQ(m.lookup(h1, 0, t1), a);
  EXPECT_EQ(m.ref_count(a), 1);
  // The wrong parent or different tokens under the same hash find nothing.
  EXPECT_FALSE(m.lookup(h2, 0, t2).has_value());
  EXPECT_FALSE(m.lookup(h2, h1, t1).has_value());
  // Allocation evicts b (the only unused cached block) and forgets it.
  EXPECT_EQ(m.allocate(), b);
  EXPECT_EQ(m.num_cached(), 1);
  EXPECT_FALSE(m.lookup(h2, h1, t2).has_value());
  m.release(b);
  m.release(a);
  m.clear_cache();
  EXPECT_EQ(m.num_cached(), 0);
  EXPECT_FALSE(m.lookup(h1, 0, t1).has_value());
  EXPECT_EQ(m.num_available(), 2);
}

TEST(BlockManager, HashDependsOnParentAndTokens) {
  const int32_t t[3] = {1, 2, 3}, u[3] = {1, 2, 4};
  EXPECT_NE(BlockManager::hash_block(0, t, 3), BlockManager::hash_block(1, t, 3));
  EXPECT_NE(BlockManager::hash_block(0, t, 3), BlockManager::hash_block(0, u, 3));
  EXPECT_EQ(BlockManager::hash_block(7, t, 3), BlockManager::hash_block(7, t, 3));
}

}  // namespace
}  // namespace r1lab::rollout
