// Host/device qualifiers so one inline function serves g++ (csrc/cpu) and nvcc (csrc/cuda).
#pragma once

#if defined(__CUDACC__)
#define EF_HD __host__ __device__ __forceinline__
#else
// always_inline: the pointwise loops must vectorize, and in the bfloat16 loop clones gcc otherwise
// leaves exp/sigmoid as per-element calls (measured: the bf16 LSTM step 3x slower than float).
#define EF_HD inline __attribute__((always_inline))
#endif

// Note [CPU multiversioning]: the extension is compiled for the baseline x86-64 ISA so that one
// binary runs everywhere; the hot CPU pointwise loops are cloned for AVX2+FMA and AVX-512 and the
// loader picks the best clone for the running CPU (GNU ifunc). Lambdas do not inherit the
// attribute, so a cloned loop is always a named function that at::parallel_for's lambda calls.
// The AVX2 clones vectorize only with -fno-trapping-math (setup.py, CMakeLists.txt): a clip or select
// is a compare on one side of a branch, which gcc otherwise speculates only with AVX-512's masks.
// tests/test_build.py checks that every AVX2 clone of the pointwise loops uses 256-bit vectors.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__CUDACC__) && \
    !defined(ELMO_FAST_NO_MULTIVERSION)
#define EF_CPU_MULTIVERSION __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define EF_CPU_MULTIVERSION
#endif
