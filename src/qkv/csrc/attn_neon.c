/* The kernel (attn_kernel.h) for ARM64: NEON (Advanced SIMD) is part of every ARMv8-A core. */
#if defined(__aarch64__)
#include "vec_neon.h"

static int runs(void) { return 1; }

#define QKV_ISA_SYM qkv_isa_neon
#define QKV_ISA_NAME "neon"
#define QKV_ISA_RUNS runs
#include "attn_kernel.h"
#else
typedef int qkv_no_neon_here;
#endif
