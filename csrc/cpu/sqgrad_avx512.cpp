// sqgrad kernel compiled for AVX-512 F/BW/VL/DQ (chosen at run time by sqgrad.cpp).
#include "sqgrad_isa.h"
#if FASTCL_X86_DISPATCH
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
#define FASTCL_SQGRAD_NS sqgrad_avx512
#define FASTCL_SQGRAD_WIDTH 16
#define FASTCL_SQGRAD_ROWS 6
#define FASTCL_SQGRAD_SUMS_IN_REGISTERS true
#include "sqgrad_impl.inc"
