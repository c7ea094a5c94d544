// Who owns which block of the paged latent cache: reference counts (a prompt's blocks are shared by the
// G samples of its group, copy-on-write), and a prefix cache of full blocks keyed by their content, so
// that prompts starting with the same tokens (every R1 prompt opens with the same template) reuse
// computed latents across requests. Cached blocks nobody uses stay until space is needed, then the least
// recently used go first. Single-threaded: the engine's step loop owns it.
#pragma once

#include <cstdint>
#include <list>
#include <optional>
#include <unordered_map>
#include <vector>

namespace r1lab::rollout {

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int block_size);

  int64_t num_blocks() const { return static_cast<int64_t>(ref_.size()); }
  int block_size() const { return block_size_; }
  // Blocks an allocate() can return now: never-used or released ones, plus cached ones nobody holds.
  int64_t num_available() const { return static_cast<int64_t>(free_.size() + lru_.size()); }
  // Blocks held by at least one sequence.
  int64_t num_in_use() const { return num_blocks() - num_available(); }
  // Blocks in the prefix cache (held or not).
  int64_t num_cached() const { return static_cast<int64_t>(by_hash_.size()); }
  int ref_count(int32_t block) const { return ref_[block]; }

  // A block for the caller (reference count 1): a free block, else the least recently used cached block
  // (which leaves the cache). nullopt when every block is held.
  std::optional<int32_t> allocate();
  void retain(int32_t block);
  // Drops one reference; at zero a cached block stays findable until evicted, any other becomes free.
  void release(int32_t block);

  // The hash of a full block of `tokens` following a prefix whose hash is `parent` (0 for the first).
  static uint64_t hash_block(uint64_t parent, const int32_t* tokens, int n);
  // The cached block holding exactly these tokens after that prefix, retained for the caller.
  std::optional<int32_t> lookup(uint64_t hash, uint64_t parent, const int32_t* tokens);
  // Registers a full, computed block under its hash. No-op when the hash is already cached.
  void publish(int32_t block, uint64_t hash, uint64_t parent, const int32_t* tokens);
  // Forgets every cached block (the weights changed, so their latents are stale).
  void clear_cache();

 private:
  struct Entry {
    int32_t block;
    uint64_t parent;
    std::vector<int32_t> tokens;  // checked on lookup: a hash collision never returns wrong latents
  };
  int block_size_;
  std::vector<int> ref_;
  std::vector<int32_t> free_;                         // unused, not cached (a stack)
  std::list<int32_t> lru_;                            // cached, unused: front = least recently used
  std::vector<std::list<int32_t>::iterator> lru_pos_;  // per block, valid while in lru_
  std::vector<std::optional<uint64_t>> hash_of_;      // per block
  std::unordered_map<uint64_t, Entry> by_hash_;
};

}  // namespace r1lab::rollout
