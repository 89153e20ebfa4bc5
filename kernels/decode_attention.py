"""Placeholder: being written (see the kernels issue)."""


def paged_decode_attention(*args, **kwargs):
    raise NotImplementedError("paged_decode_attention is not written yet")
