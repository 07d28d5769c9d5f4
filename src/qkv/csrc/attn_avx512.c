/* The kernel (attn_kernel.h) for CPUs with AVX-512 F, DQ, VL and BW. */
#if defined(__x86_64__) || defined(_M_X64)
#include "vec_avx512.h"

static int runs(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq")
        && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
        && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

#define QKV_ISA_SYM qkv_isa_avx512
#define QKV_ISA_NAME "avx512"
#define QKV_ISA_RUNS runs
#include "attn_kernel.h"
#else
typedef int qkv_no_avx512_here;
#endif
