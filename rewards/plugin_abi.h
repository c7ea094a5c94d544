/* The C ABI of r1lab reward plugins: a shared library built without r1lab that r1lab loads by path
 * (a recipe's or reward config's "plugins": [{"library": "path/to/libmy_reward.so"}]).
 *
 * A plugin exports the five functions below with C linkage. r1lab calls r1lab_reward_score from many
 * threads at once, so a reward must be safe to call concurrently (or lock inside). Strings passed in are
 * UTF-8 with explicit lengths (not NUL-terminated) and live only for the call. The layout of these
 * structs changes only with R1LAB_REWARD_ABI_VERSION. examples/cpp_reward_plugin/ is a complete one. */
#ifndef R1LAB_REWARDS_PLUGIN_ABI_H_
#define R1LAB_REWARDS_PLUGIN_ABI_H_

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#define R1LAB_REWARD_ABI_VERSION 1
#define R1LAB_REWARD_MAX_COMPONENTS 16

typedef struct {
  const char* data;
  size_t size;
} r1lab_text;

typedef struct {
  r1lab_text prompt;
  r1lab_text completion; /* the generated text to judge */
  r1lab_text reference;  /* the reference answer, empty when the task has none */
  r1lab_text task;
  r1lab_text meta_json;  /* task metadata, a JSON object */
} r1lab_sample;

typedef struct {
  double value;
  /* Named parts (NUL-terminated names); at most R1LAB_REWARD_MAX_COMPONENTS. */
  int num_components;
  char component_names[R1LAB_REWARD_MAX_COMPONENTS][64];
  double component_values[R1LAB_REWARD_MAX_COMPONENTS];
  /* Why the sample could not be judged (NUL-terminated; empty when it was). */
  char error[256];
} r1lab_score;

/* Returns R1LAB_REWARD_ABI_VERSION as compiled into the plugin. */
int r1lab_reward_abi_version(void);
/* The rewards this plugin offers, comma-separated ("brevity,keywords"); static storage. */
const char* r1lab_reward_names(void);
/* A reward instance for `name` with its parameters (a JSON object, NUL-terminated). NULL on failure,
 * with a NUL-terminated message in error[0 .. error_size). */
void* r1lab_reward_create(const char* name, const char* params_json, char* error, size_t error_size);
/* Scores one sample into *out (zeroed by the caller). Returns 0, or nonzero when the plugin failed
 * (then out->error says why). */
int r1lab_reward_score(void* reward, const r1lab_sample* sample, r1lab_score* out);
void r1lab_reward_destroy(void* reward);

#ifdef __cplusplus
}
#endif

#endif /* R1LAB_REWARDS_PLUGIN_ABI_H_ */
