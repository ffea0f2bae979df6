// Distillation kernel compiled for AVX-512 F/BW/VL/DQ (chosen at run time by distill.cpp).
#include "distill_isa.h"
#if FASTCL_X86_DISPATCH
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")
#endif
#define FASTCL_DISTILL_NS isa_avx512
#include "distill_impl.inc"
