// Distillation kernel compiled for AVX2 + FMA (chosen at run time by distill.cpp).
#include "distill_isa.h"
#if FASTCL_X86_DISPATCH
#pragma GCC target("avx2,fma")
#endif
#define FASTCL_DISTILL_NS isa_avx2
#include "distill_impl.inc"
