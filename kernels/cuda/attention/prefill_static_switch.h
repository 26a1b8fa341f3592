// Turns a runtime bool into a compile-time constant in one place, so a launcher reads
//   PREFILL_BOOL_SWITCH(params.causal, kCausal, [&] { launch<Traits, kCausal>(...); });
// and every variant of the kernel is instantiated in the file that expands it.
#pragma once

#define PREFILL_BOOL_SWITCH(condition, constant_name, ...)      \
  [&] {                                                         \
    if (condition) {                                            \
      constexpr bool constant_name = true;                      \
      return __VA_ARGS__();                                     \
    } else {                                                    \
      constexpr bool constant_name = false;                     \
      return __VA_ARGS__();                                     \
    }                                                           \
  }()
