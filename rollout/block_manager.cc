#include "rollout/block_manager.h"

#include <algorithm>

#include "core/check.h"

namespace r1lab::rollout {

BlockManager::BlockManager(int64_t num_blocks, int block_size)
    : block_size_(block_size),
      ref_(static_cast<size_t>(num_blocks), 0),
      lru_pos_(static_cast<size_t>(num_blocks)),
      hash_of_(static_cast<size_t>(num_blocks)) {
  CHECK_GT(num_blocks, 0);
  CHECK_GT(block_size, 0);
  // Low block ids first.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

std::optional<int32_t> BlockManager::allocate() {
  int32_t b;
  if (!free_.empty()) {
    b = free_.back();
    free_.pop_back();
  } else if (!lru_.empty()) {
    b = lru_.front();
    lru_.pop_front();
    by_hash_.erase(*hash_of_[b]);
    hash_of_[b].reset();
  } else {
    return std::nullopt;
  }
  CHECK_EQ(ref_[b], 0);
  ref_[b] = 1;
  return b;
}

void BlockManager::retain(int32_t b) {
  if (ref_[b] == 0) {
    CHECK(hash_of_[b].has_value()) << "retain of free block " << b;
    lru_.erase(lru_pos_[b]);
  }
  ++ref_[b];
}

void BlockManager::release(int32_t b) {
  CHECK_GT(ref_[b], 0) << "release of free block " << b;
  if (--ref_[b] > 0) return;
  if (hash_of_[b]) {
    lru_pos_[b] = lru_.insert(lru_.end(), b);
  } else {
    free_.push_back(b);
  }
}

uint64_t BlockManager::hash_block(uint64_t parent, const int32_t* tokens, int n) {
  // FNV-1a over the parent hash and the token ids, then a splitmix64 finaliser.
  uint64_t h = 1469598103934665603ull ^ parent;
  for (int i = 0; i < n; ++i) {
    h ^= static_cast<uint32_t>(tokens[i]);
    h *= 1099511628211ull;
  }
  h += 0x9e3779b97f4a7c15ull;
  h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
  h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

std::optional<int32_t> BlockManager::lookup(uint64_t hash, uint64_t parent, const int32_t* tokens) {
  auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return std::nullopt;
  const Entry& e = it->second;
  if (e.parent != parent || !std::equal(e.tokens.begin(), e.tokens.end(), tokens)) return std::nullopt;
  retain(e.block);
  return e.block;
}

void BlockManager::publish(int32_t b, uint64_t hash, uint64_t parent, const int32_t* tokens) {
  CHECK_GT(ref_[b], 0);
  if (hash_of_[b] || by_hash_.count(hash)) return;
  by_hash_.emplace(hash, Entry{b, parent, std::vector<int32_t>(tokens, tokens + block_size_)});
  hash_of_[b] = hash;
}

void BlockManager::clear_cache() {
  for (int32_t b : lru_) free_.push_back(b);
  lru_.clear();
  for (auto& h : hash_of_) h.reset();
  by_hash_.clear();
}

}  // namespace r1lab::rollout
