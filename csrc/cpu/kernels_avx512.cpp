// AVX-512 build, chosen at run time on CPUs with AVX-512 F/BW/VL/DQ.
//
// setup.py compiles this file alone with the ISA flags of its capability (CAPABILITY_SOURCES)
// and links it after the default-target objects, so the linker keeps the default copy of any
// inline function that both emit; the vector code itself lives in namespaces named by CPU_CAPABILITY.
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "kernels_impl.h"
