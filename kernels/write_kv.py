"""Placeholder: being written (see the kernels issue)."""


def write_kv(*args, **kwargs):
    raise NotImplementedError("write_kv is not written yet")
