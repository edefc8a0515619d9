"""Triton kernels with their PyTorch references: fused sampling, token log-probs / entropy, fused linear log-probs.

`kernels` imports only torch and triton. backend="auto" runs Triton on CUDA tensors and the PyTorch reference
elsewhere; "triton" forces Triton (CPU tensors only under TRITON_INTERPRET=1); "torch" is the reference.
Each module's docstring states its algorithm and cost.
"""
if __name__ != "align.kernels":  # imported as bare `kernels` from a checkout: see align/_bare_names.py
    from align._bare_names import hand_over

    hand_over(__name__, __file__)
else:
    from align.kernels.fused_linear import fused_linear_logprobs, transform_logits
    from align.kernels.logprobs import token_logprobs
    from align.kernels.logprobs_reference import token_logprobs_reference
    from align.kernels.sampling import sample, sample_triton
    from align.kernels.sampling_reference import SampleOutput, sample_reference

    __all__ = [
        "SampleOutput",
        "fused_linear_logprobs",
        "sample",
        "sample_reference",
        "sample_triton",
        "token_logprobs",
        "token_logprobs_reference",
        "transform_logits",
    ]
