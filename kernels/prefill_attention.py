"""Placeholder: being written (see the kernels issue)."""


def paged_prefill_attention(*args, **kwargs):
    raise NotImplementedError("paged_prefill_attention is not written yet")
