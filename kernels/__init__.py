"""tera.kernels: the MoE hot path as Triton kernels with torch references.

One module per op (router, permute, grouped_gemm) holds its shape legend, the
`@triton.jit` kernels, a thin launching wrapper, the torch reference and the autograd
function; tera.kernels.dispatch picks the kernel for CUDA tensors and the reference
elsewhere, and is what the model calls. No torch.distributed here.
"""
