"""Device arrays: PyTorch CUDA tensors, CuPy arrays and other ``__cuda_array_interface__`` producers.

The op layer describes such an array by a :class:`DeviceArray` (address, shape, dtype, device, stream)
so that shapes and dtypes are validated like NumPy arrays without copying data to the host. Only the
``cuda`` backend computes on them; the other backends receive host copies (:func:`to_host_args`).
"""
from __future__ import annotations

import dataclasses

import numpy as np

_DLPACK_CUDA = 2  # kDLCUDA
_TORCH_DTYPES = ("int8", "uint8", "int32", "int64", "float32")
_CREATED = [False]  # whether any DeviceArray was ever made (none: no argument can hold one)


@dataclasses.dataclass(frozen=True)
class DeviceArray:
    """A C-contiguous array in CUDA device memory, with the object that owns it."""

    owner: object
    ptr: int
    shape: tuple
    dtype: np.dtype
    device: int
    kind: str  # "torch" | "cupy" | "cai"
    stream: int  # the stream the producer asks consumers to order after (0 = legacy default)

    def __post_init__(self):
        _CREATED[0] = True

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def reshape(self, *shape) -> "DeviceArray":
        shape = tuple(int(s) for s in (shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape))
        if int(np.prod(shape, dtype=np.int64)) != self.size:
            raise ValueError(f"cannot reshape a device array of shape {self.shape} to {shape}")
        return dataclasses.replace(self, shape=shape)

    def to_host(self) -> np.ndarray:
        """A NumPy copy (synchronizes the array's stream)."""
        out = np.empty(self.shape, self.dtype)
        if out.size:
            cu = _cuda_module()
            saved = cu.current_device()
            cu.set_device(self.device)
            try:
                cu.download(self.ptr, out.nbytes, out, self.stream)
            finally:
                cu.set_device(saved)
        return out

    def max(self) -> int:
        """Largest element of a uint8 array (synchronizes the array's stream)."""
        if self.size == 0:
            raise ValueError("max of an empty array")
        cu = _cuda_module()
        saved = cu.current_device()
        cu.set_device(self.device)
        try:
            return int(cu.max_byte(self.ptr, self.size, self.stream))
        finally:
            cu.set_device(saved)


def _cuda_module():
    try:
        from ._C import cuda
    except ImportError:
        raise RuntimeError("CUDA arrays need a CUDA build of pyqsim (see pyqsim.build_info()['cuda'])") from None
    return cuda


def _is_torch_cuda(a) -> bool:
    mod = type(a).__module__
    return mod.startswith("torch") and getattr(a, "is_cuda", False)


def _torch_array(a, name: str) -> DeviceArray:
    import torch
    if not a.is_contiguous():
        a = a.contiguous()
    dt = str(a.dtype).replace("torch.", "")
    try:
        np_dtype = np.dtype(dt)
    except TypeError:
        raise TypeError(f"{name}: torch.{dt} has no NumPy equivalent (expected {' or '.join(_TORCH_DTYPES)})") from None
    stream = torch.cuda.current_stream(a.device).cuda_stream
    return DeviceArray(a, int(a.data_ptr()), tuple(a.shape), np_dtype, int(a.device.index), "torch", int(stream))


def _cai_array(a, name: str) -> DeviceArray:
    cai = a.__cuda_array_interface__
    shape = tuple(int(s) for s in cai["shape"])
    dtype = np.dtype(cai["typestr"])
    strides = cai.get("strides")
    if strides is not None:
        c_strides, acc = [], dtype.itemsize
        for s in reversed(shape):
            c_strides.append(acc)
            acc *= s
        c_strides = tuple(reversed(c_strides))
        mismatch = any(d > 1 and st != cs for d, st, cs in zip(shape, strides, c_strides))
        if mismatch and 0 not in shape:
            kind = type(a).__module__.split(".")[0]
            if kind == "cupy":
                import cupy
                return _cai_array(cupy.ascontiguousarray(a), name)
            raise ValueError(f"{name} must be a C-contiguous device array (strides {strides} for shape {shape})")
    ptr = int(cai["data"][0])
    kind = "cupy" if type(a).__module__.split(".")[0] == "cupy" else "cai"
    if kind == "cupy":
        device = int(a.device.id)
        import cupy
        with cupy.cuda.Device(device):
            stream = int(cupy.cuda.get_current_stream().ptr)
    elif not ptr:
        device, stream = 0, 0  # an empty array: no device memory behind it
    else:
        device = _cuda_module().pointer_device(ptr)
        if device < 0:
            raise ValueError(f"{name}: __cuda_array_interface__ address is not CUDA device memory")
    if kind == "cai" and ptr:
        stream = cai.get("stream") or 0  # 1 / 2: the legacy / per-thread default stream handles
    return DeviceArray(a, ptr, shape, dtype, device, kind, int(stream))


def is_device(a) -> bool:
    """True for a CUDA tensor/array (never for NumPy)."""
    if isinstance(a, (np.ndarray, DeviceArray)):
        return isinstance(a, DeviceArray)
    if _is_torch_cuda(a) or hasattr(a, "__cuda_array_interface__"):
        return True
    dev = getattr(a, "__dlpack_device__", None)
    if dev is not None:
        try:
            return dev()[0] == _DLPACK_CUDA
        except Exception:
            return False
    return False


def device_array(a, name: str) -> DeviceArray:
    """Describe a device array, made C-contiguous (a copy on the device when it is not)."""
    if isinstance(a, DeviceArray):
        return a
    if _is_torch_cuda(a):
        return _torch_array(a, name)
    if hasattr(a, "__cuda_array_interface__"):
        return _cai_array(a, name)
    raise TypeError(f"{name}: CUDA arrays are accepted through __cuda_array_interface__ (PyTorch, CuPy, Numba); "
                    f"a {type(a).__name__} offers DLPack only")


def host(a):
    """NumPy view of a host array, host copy of a device array."""
    if isinstance(a, DeviceArray):
        return a.to_host()
    if not isinstance(a, np.ndarray) and is_device(a):
        return device_array(a, "array").to_host()
    return a


def has_device_arrays(args) -> bool:
    """Whether canonical op arguments (nested dataclasses) hold a DeviceArray."""
    if not _CREATED[0]:
        return False
    if isinstance(args, DeviceArray):
        return True
    if dataclasses.is_dataclass(args):
        return any(has_device_arrays(getattr(args, f.name)) for f in dataclasses.fields(args))
    return False


def to_host_args(args):
    """Canonical arguments with every DeviceArray replaced by a NumPy copy."""
    if isinstance(args, DeviceArray):
        return args.to_host()
    if dataclasses.is_dataclass(args):
        return dataclasses.replace(args, **{f.name: to_host_args(getattr(args, f.name))
                                            for f in dataclasses.fields(args) if f.init})
    return args
