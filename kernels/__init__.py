"""Triton kernels of pyconv's GPU path (`--device cuda`): fused row permutation (QKV) + cast,
fp32/bf16/fp16 casts, fp8 e4m3fn 128x128 block dequantization and quantization.

Kept in the repository's top-level kernels/ but installed as pyconv._kernels (pyproject.toml's
wheel.force-include), never as a top-level `kernels`: that name is Hugging Face's distribution.
Importing this package imports torch and triton; pyconv imports it only for --device cuda.
Every cast is integer bit arithmetic (kernels/bits.py), so results equal torch's CPU casts
and pyconv's C++ core bit for bit, on a GPU and under TRITON_INTERPRET=1 on a CPU."""
