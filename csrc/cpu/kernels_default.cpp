// Baseline build: runs on every x86-64 (and non-x86) CPU.

#define CPU_CAPABILITY DEFAULT
#define CPU_CAPABILITY_DEFAULT
#include "kernels_impl.h"
