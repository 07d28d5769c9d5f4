/* The kernel (attn_kernel.h) for CPUs with AVX2, FMA and F16C (x86-64 since Haswell / Zen). */
#if defined(__x86_64__) || defined(_M_X64)
#include "vec_avx2.h"

static int runs(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#define QKV_ISA_SYM qkv_isa_avx2
#define QKV_ISA_NAME "avx2"
#define QKV_ISA_RUNS runs
#include "attn_kernel.h"
#else
typedef int qkv_no_avx2_here;
#endif
