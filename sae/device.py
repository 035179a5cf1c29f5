"""Devices and compute dtypes for every job (`--device`, `--dtype`), checked before any work.

    --device  cpu | cuda | cuda:N | auto (cuda when there is one, else cpu)
    --dtype   auto (float32 on CPU, bfloat16 on CUDA) | float32 | bfloat16 | float16

This is the COMPUTE dtype of the model's forward pass. An activation store keeps its own storage
dtype (`python -m sae harvest --store-dtype`). bf16 compute on CPU is several times slower than
fp32 there (see DESIGN.md), hence the CPU default.

`check_fits` refuses a model whose parameters would not fit the device's free memory, from the
config alone (a meta-device build: no weights read), and names the ways out.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

DEVICE_FORMS = "cpu, cuda, cuda:N or auto"
ComputeDtype = Literal["auto", "float32", "bfloat16", "float16"]  # a --dtype field's type
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_FORMS = "auto, " + ", ".join(COMPUTE_DTYPES)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """A torch.device from a --device value; an error before any work for a device not here."""
    if isinstance(device, torch.device):
        device = str(device)
    name = device.strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        index = name.partition(":")[2]
        if index and not index.isdigit():
            raise ValueError(f"bad device {device!r}: the CUDA index must be a number (cuda:0)")
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device} asks for CUDA but this torch sees no CUDA device "
                f"(torch {torch.__version__}); use --device cpu or --device auto"
            )
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices "
                f"(cuda:0..cuda:{torch.cuda.device_count() - 1})"
            )
        return torch.device(name)
    raise ValueError(f"unknown device {device!r}; use one of {DEVICE_FORMS}")


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """The compute dtype: `auto` is float32 on CPU and bfloat16 on CUDA."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"unknown compute dtype {dtype!r}; use one of {DTYPE_FORMS}")
    return COMPUTE_DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def param_bytes(config: Any, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters at `dtype`, from its config alone (meta tensors: no memory,
    no weights read). Tied weights count once."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    n_params = sum(p.numel() for p in model.parameters())  # parameters() skips tied repeats
    return n_params * torch.tensor([], dtype=dtype).element_size()


def free_bytes(device: torch.device) -> int:
    """Memory free now on `device`: torch.cuda.mem_get_info on CUDA, available RAM on CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def check_fits(config: Any, dtype: torch.dtype, device: torch.device, spec: str) -> None:
    """Refuse before loading a model whose parameters exceed the device's free memory."""
    need, free = param_bytes(config, dtype), free_bytes(device)
    if need <= free:
        return
    smaller = "float16/bfloat16" if dtype == torch.float32 else "a smaller dtype"
    raise MemoryError(
        f"{spec} needs about {need / 2**30:.2f} GiB for its parameters in {dtype_name(dtype)} "
        f"but {device} has {free / 2**30:.2f} GiB free. Spread it over devices with "
        f'device_map="auto" (--device-map auto), or load it in {smaller} (--dtype), or use a '
        "smaller model"
    )
