"""The argument checks the functional API and the fused ops' own modules share (vae_ext.functional,
vae_ext.dmol, vae_ext.latent): Python types, devices, autocast's dtypes, option strings, beta,
free bits, ``num_samples`` and ``generator``, each a ``TypeError``/``ValueError`` that names the argument."""
from __future__ import annotations

import math
import numbers

import torch

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INT64_MAX = 2**63 - 1


def _check_is_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{name}: expected a float32, float64, float16 or bfloat16 tensor, got dtype {t.dtype}"
        )


def _check_target_dtype(x, recon_x) -> None:
    """An integer target (uint8 pixels as an image loader returns them) says how to convert it; the
    op would only say that the dtypes differ. (Off the fast path: mixed dtypes never take it.)"""
    if recon_x.dtype in _FLOAT_DTYPES and not (x.dtype.is_floating_point or x.dtype.is_complex):
        how = "x.to(recon_x.dtype)" + (" / 255 (8-bit pixels into [0, 1])" if x.dtype == torch.uint8 else "")
        raise TypeError(f"x: expected the same dtype as recon_x ({recon_x.dtype}), got {x.dtype}; convert it: {how}")


def _check_same(names_tensors, what: str) -> None:
    (n0, t0), *rest = names_tensors
    for n, t in rest:
        a, b = (t0.dtype, t.dtype) if what == "dtype" else (t0.device, t.device)
        if a != b:
            err = TypeError if what == "dtype" else ValueError
            raise err(f"{n}: expected the same {what} as {n0} ({a}), got {b}")


def _autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for a type autocast does not know, "meta").

    Not ``torch.amp.is_autocast_available``: torch.compile cannot trace it before torch 2.13
    (fullgraph=True fails on torch 2.11), while it traces ``torch.is_autocast_enabled``, which
    raises RuntimeError for an unknown type."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _autocast_common_dtype(tensors):
    """Under ``torch.autocast`` for their device, float tensors of mixed dtypes (a bfloat16 decoder
    output beside a float32 batch x) are brought to their promoted dtype, as autocast's "promote"
    ops do; otherwise they are returned as they are (and a mismatch is an error below).

    The kernels compute in float32 for half inputs whatever happens, and widening a half tensor is
    exact, so this gives what autocast's float32 policy for losses gives, without widening inputs
    that all share a half dtype.
    """
    dev = tensors[0].device if isinstance(tensors[0], torch.Tensor) else None
    if (dev is None or not all(isinstance(t, torch.Tensor) and t.device == dev and t.dtype in _FLOAT_DTYPES
                               for t in tensors)
            or not _autocast_enabled(dev.type)):
        return tensors
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors)


def _check_choice(name: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")


def _check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
        raise TypeError(f"beta: expected a Python float >= 0, got {type(beta).__name__}")
    if isinstance(beta, numbers.Integral):  # beta * kl would read an int as a 64-bit int: 10**30 overflows
        try:
            beta = float(beta)
        except OverflowError:
            raise ValueError("beta: expected a finite float >= 0, got a number beyond float's range") from None
    # Comparisons only (no math.isfinite): under torch.compile beta may be a symbolic float.
    if not (beta >= 0.0 and beta < math.inf):
        raise ValueError(f"beta: expected a finite float >= 0, got {beta}")
    return beta


def _check_free_bits(free_bits) -> float:
    # its value is checked by the op (csrc/checks.cpp); the type must be right to reach it
    if isinstance(free_bits, bool) or not isinstance(free_bits, numbers.Real):
        raise TypeError("free_bits: expected a Python float >= 0 (nats per latent unit), got "
                        f"{type(free_bits).__name__}")
    try:
        return float(free_bits)
    except OverflowError:  # an int beyond float's range, 10**400
        raise ValueError("free_bits: expected a finite float >= 0 (nats per latent unit), got a number beyond "
                         "float's range") from None


def _check_num_samples(num_samples) -> int:
    """The op's draws per element: 0 for None (no samples dimension), else an int >= 1."""
    if num_samples is None:
        return 0
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise TypeError(f"num_samples: expected None or an int >= 1, got {type(num_samples).__name__}")
    if num_samples < 1:
        raise ValueError(f"num_samples: expected None or an int >= 1, got {num_samples}")
    if num_samples > _INT64_MAX:  # the op's int; the op itself bounds it by what z can hold
        raise ValueError(f"num_samples: expected an int that fits in int64, got {num_samples}")
    return int(num_samples)


def _check_generator(generator, mu) -> None:
    """None, or a torch.Generator of mu's device type."""
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != mu.device.type:
        raise ValueError(f"generator: expected a generator on {mu.device.type} (mu's device), "
                         f"got one on {generator.device.type}")
