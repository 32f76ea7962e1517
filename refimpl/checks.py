"""Input checks shared by the modules: each failure names the argument, what was expected and what was given."""

import torch


def check_tensor(name: str, x, ndim: int | None = None, dtype_floating: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d tensor, got shape {tuple(x.shape)}")
    if dtype_floating and not x.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")


def check_last_dim(name: str, x: torch.Tensor, size: int) -> None:
    check_tensor(name, x)
    if x.dim() == 0 or x.shape[-1] != size:
        raise ValueError(f"{name}: expected last dimension {size}, got shape {tuple(x.shape)}")


def check_shape(name: str, x, shape: tuple) -> None:
    """`shape` may hold None for a dimension that can be anything."""
    check_tensor(name, x, ndim=len(shape))
    if any(want is not None and want != got for want, got in zip(shape, x.shape)):
        wanted = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{name}: expected shape {wanted}, got {tuple(x.shape)}")


def check_same_dtype_device(name: str, x: torch.Tensor, like: torch.Tensor, like_name: str = "the module's weights") -> None:
    if x.dtype != like.dtype:
        raise TypeError(f"{name}: expected dtype {like.dtype} (that of {like_name}), got {x.dtype}")
    if x.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (that of {like_name}), got {x.device}")


def check_token_ids(name: str, ids, vocab_size: int) -> None:
    check_tensor(name, ids, ndim=2)
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name}: expected an integer tensor (int64 or int32), got dtype {ids.dtype}")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(
            f"{name}: expected token ids in [0, {vocab_size}), got values from {int(ids.min())} to {int(ids.max())}"
        )


def check_int(name: str, value, minimum: int, note: str = "") -> None:
    """An int (not a bool) >= minimum; `note` adds context to the message, e.g. the cache length."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= {minimum}{note}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}{note}, got {value}")


def check_number(name: str, value, positive: bool = False) -> None:
    """A real number (not a bool), > 0 if `positive`, else >= 0. NaN fails both."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number, got {value!r} ({type(value).__name__})")
    if not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name}: expected a {'positive' if positive else 'non-negative'} number, got {value}")
