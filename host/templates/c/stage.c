// The {{name}} stage, in C. It lower-cases event_type and rejects events
// with a negative price: replace the rules in `process` with yours.
// Build: `bash build.sh`; try it: `host plugin test ../../{{name}}.wasm --input sample.csv`.
//
// Memory rules of the generated bindings (gen/plugin.h):
// - Arguments of the exported functions belong to this code: free what
//   you do not pass on. An empty list's pointer is not a heap pointer
//   (the host calls `process` with empty batches): never free it.
// - What the functions return (events, reasons, error strings) is freed
//   by the generated code after the host has read it: return malloc'd
//   memory only, never a string literal or a static buffer.
// - `result<_, string>` is a bool (true: ok) plus an out-parameter for
//   the error string.

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "plugin.h"

typedef ecommerce_pipeline_types_event_t event_t;
typedef ecommerce_pipeline_types_rejected_t rejected_t;

static void log_line(uint8_t level, const char *text) {
  plugin_string_t message;
  plugin_string_set(&message, text); // borrowed for the call
  plugin_log(level, &message);
}

bool exports_ecommerce_pipeline_stage_init(plugin_list_tuple2_string_string_t *config,
                                           plugin_string_t *err) {
  (void)err;
  char line[96];
  snprintf(line, sizeof line, "{{name}}: started with %zu settings", config->len);
  log_line(2, line);
  if (config->len > 0) {
    plugin_list_tuple2_string_string_free(config);
  }
  return true;
}

bool exports_ecommerce_pipeline_stage_process(exports_ecommerce_pipeline_stage_list_event_t *batch,
                                              exports_ecommerce_pipeline_stage_batch_result_t *ret,
                                              plugin_string_t *err) {
  (void)err;
  size_t n = batch->len;
  ret->events.ptr = NULL;
  ret->events.len = 0;
  ret->rejected.ptr = NULL;
  ret->rejected.len = 0;
  if (n == 0) {
    return true; // batch->ptr is no heap pointer here
  }
  ret->events.ptr = malloc(n * sizeof(event_t));
  ret->rejected.ptr = malloc(n * sizeof(rejected_t));
  for (size_t i = 0; i < n; i++) {
    // The event's strings move into the result: not freed here.
    event_t event = batch->ptr[i];
    if (event.price_cents < 0) {
      rejected_t *r = &ret->rejected.ptr[ret->rejected.len++];
      r->event = event;
      plugin_string_dup(&r->reason, "negative price");
      continue;
    }
    for (size_t c = 0; c < event.event_type.len; c++) {
      event.event_type.ptr[c] = (uint8_t)tolower(event.event_type.ptr[c]);
    }
    ret->events.ptr[ret->events.len++] = event;
  }
  free(batch->ptr); // the array only: its events were moved
  return true;
}

void exports_ecommerce_pipeline_stage_snapshot(plugin_list_u8_t *ret) {
  ret->ptr = NULL; // stateless
  ret->len = 0;
}

bool exports_ecommerce_pipeline_stage_restore(plugin_list_u8_t *state, plugin_string_t *err) {
  (void)err;
  if (state->len > 0) {
    free(state->ptr);
  }
  return true;
}
