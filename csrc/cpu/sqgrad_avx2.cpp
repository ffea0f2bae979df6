// sqgrad kernel compiled for AVX2 + FMA (chosen at run time by sqgrad.cpp).
#include "sqgrad_isa.h"
#if FASTCL_X86_DISPATCH
#pragma GCC target("avx2,fma")
#endif
#define FASTCL_SQGRAD_NS sqgrad_avx2
#define FASTCL_SQGRAD_WIDTH 8
#define FASTCL_SQGRAD_ROWS 6
#define FASTCL_SQGRAD_SUMS_IN_REGISTERS false
#include "sqgrad_impl.inc"
