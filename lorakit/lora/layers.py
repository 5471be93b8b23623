"""The LoRA math: h = base(x) + scaling * B(A(dropout(x))), for Linear / GPT-2 Conv1D, Embedding, Conv2d.

A LoRA layer wraps a base module and adopts its parameters (the same dict object), so the
base's keys (`q_proj.weight`, `q_proj.bias`) stay valid; adapters live beside them under
`lora_A.<name>`, `lora_B.<name>`, ... exactly as PEFT names them inside a model.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.config import weight_init
from lorakit.lora.delta import lora_delta
from lorakit.lora.dora import dora_scale, low_rank_weight_norm, weight_norm
from lorakit.lora.init import from_weight
from lorakit.quant.linear4bit import NF4Linear


class WrapsBase(nn.Module):
    """Stands in for `base` under the same state_dict keys: it adopts base's parameter and buffer
    dicts (the same objects, so `.to()`, loading and sharding reach both) and its children.
    Attributes it lacks are read from base (in_features, padding_idx, nf, ...)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self._adopt(base)
        self.training = base.training  # the model's train / eval mode where it stands

    def train(self, mode: bool = True):
        """Also the base's own flag: it is not a child, and its forward may read it."""
        self.base_layer.training = mode
        return super().train(mode)

    def _adopt(self, base: nn.Module) -> None:
        self.__dict__["_parameters"] = base._parameters
        self.__dict__["_buffers"] = base._buffers
        self.__dict__["_non_persistent_buffers_set"] = base._non_persistent_buffers_set
        self._modules.update(base._modules)
        self.__dict__["base_layer"] = base  # not a child: its state is already ours

    def _apply(self, fn, recurse: bool = True):
        """.to() / .cuda() / .half(): the adopted tensors follow the base's own rules (a quantised
        base keeps its quantisation state's dtypes), the adapters the usual ones."""
        if recurse:
            for module in self.children():
                module._apply(fn)
        self.base_layer._apply(fn, recurse=False)
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if "base_layer" not in self.__dict__:
                raise
            return getattr(self.__dict__["base_layer"], name)


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A base module's weight as a dense tensor: dequantised if the module stores it quantised."""
    return module.dequantize() if hasattr(module, "dequantize") else module.weight


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 Conv1D (a Linear with its weight stored as in x out), without importing it."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


class LoraLayer(WrapsBase):
    """Base module + named low-rank adapters; subclasses give the adapter's shape and output."""

    inits_from_weight = False  # whether PiSSA / OLoRA (lora/init.py) can start its adapters

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.dropout: dict[str, float] = {}  # p of each adapter's input dropout, applied in train mode
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # --- adapters -------------------------------------------------------------------------
    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, use_rslora: bool,
                    use_dora: bool = False, init: bool | str = True) -> None:
        if use_dora:
            raise ValueError(f"DoRA supports Linear and Conv1D layers, not {type(self.base_layer).__name__}")
        if weight_init(init) and not self.inits_from_weight:
            raise ValueError(f"init_lora_weights={init!r} applies to Linear and Conv1D layers, not "
                             f"{type(self.base_layer).__name__}: leave it out of target_modules, or use "
                             "init_lora_weights=True")
        self.r[name] = r
        self.scaling[name] = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout[name] = dropout
        self.create_adapter(name, r, init)
        self.to_base_device(name)

    def adapter_parameters(self, name: str) -> dict[str, nn.Parameter]:
        """This adapter's parameters by their attribute path in this layer (e.g. 'lora_A.default.weight')."""
        return {k: p for k, p in self.named_parameters() if f".{name}." in f".{k}." and k.startswith("lora_")}

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise ValueError(f"adapter {name!r} is merged into this layer; unmerge it before deleting")
        for container in self._modules.values():
            if isinstance(container, (nn.ModuleDict, nn.ParameterDict)) and name in container:
                del container[name]
        for table in (self.r, self.scaling, self.dropout):
            table.pop(name, None)
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def dropout_p(self, name: str) -> float:
        """The adapter's dropout rate now: its p in train mode, 0 in eval mode."""
        return self.dropout[name] if self.training else 0.0

    def to_base_device(self, name: str) -> None:
        ref = next((t for t in [*self._parameters.values(), *self._buffers.values()] if t is not None), None)
        if ref is None or ref.device.type == "meta":
            return
        # Adapters train in fp32 (or fp64) even over a half-precision or quantised base.
        dtype = ref.dtype if ref.dtype in (torch.float32, torch.float64) else torch.float32
        for p in self.adapter_parameters(name).values():
            p.data = p.data.to(ref.device, dtype)

    # --- forward --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disabled and self.merged_adapters:
            self.unmerge()
        base_out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return base_out
        active = [n for n in self.active_adapters if n in self.r and n not in self.merged_adapters]
        if len(active) == 1:
            return self.output_with(x, active[0], base_out).to(base_out.dtype)
        result = base_out
        for name in active:
            result = result + self.adapter_output(x, name, base_out)  # summed in fp32 over a half base
        return result.to(base_out.dtype)

    def output_with(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        """The layer's output with this one adapter active (subclasses may compute it whole)."""
        return base_out + self.adapter_output(x, name, base_out)

    # --- merge ----------------------------------------------------------------------------
    def merge(self, names: list[str], safe_merge: bool = False) -> None:
        """Fold the named adapters into the base weight, in order."""
        for name in names:
            if name not in self.r or name in self.merged_adapters:
                continue
            merged = self.merged_weight(name)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} would put NaN/Inf into the weight; refusing (safe_merge)")
            self.weight.data.copy_(merged)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Take merged adapters out again, last merged first."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            self.weight.data.copy_(self.unmerged_weight(name))

    def merged_weight(self, name: str) -> torch.Tensor:
        return self.weight + self.delta_weight(name).to(self.weight.dtype)

    def unmerged_weight(self, name: str) -> torch.Tensor:
        return self.weight - self.delta_weight(name).to(self.weight.dtype)

    # subclass hooks
    def create_adapter(self, name: str, r: int, init: bool | str) -> None:
        """The adapter's tensors, initialised (the only random draws of adding an adapter)."""
        raise NotImplementedError

    def adapter_output(self, x: torch.Tensor, name: str, base_out: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling * B A, shaped like the base weight."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"base={self.base_layer!r}, adapters={ {n: self.r[n] for n in self.r} }"


def _init_pair(A: torch.Tensor, B: torch.Tensor, r: int, init: bool | str) -> None:
    """A Kaiming-uniform (or N(0, 1/r) for 'gaussian'), B zero; init=False keeps both random."""
    if init is False:
        return
    if init == "gaussian":
        nn.init.normal_(A, std=1 / r)
    else:
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
    nn.init.zeros_(B)


class LoraLinear(LoraLayer):
    """nn.Linear, or GPT-2's Conv1D whose weight is stored transposed (fan_in_fan_out)."""

    inits_from_weight = True

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.fan_in_fan_out = is_conv1d(base)
        shape = (base.out_features, base.in_features) if hasattr(base, "dequantize") else base.weight.shape
        d_in, d_out = shape if self.fan_in_fan_out else shape[::-1]
        self.in_features, self.out_features = d_in, d_out
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self._dora_merge_norm: dict[str, torch.Tensor] = {}

    def add_adapter(self, name, r, alpha, dropout, use_rslora, use_dora=False, init=True) -> None:
        super().add_adapter(name, r, alpha, dropout, use_rslora, False, init)
        if use_dora:
            self.lora_magnitude_vector[name] = nn.Parameter(self.initial_magnitude(name))

    @torch.no_grad()
    def initial_magnitude(self, name: str) -> torch.Tensor:
        """DoRA's magnitude as an adapter starts: ||W + s·B·A|| per output feature, in the adapter's dtype."""
        return self._weight_norm(self.delta_weight_out_in(name)).to(self.lora_A[name].weight.dtype)

    def create_adapter(self, name, r, init) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)
        if weight_init(init):
            self._init_from_weight(name, r, init)
        else:
            _init_pair(self.lora_A[name].weight, self.lora_B[name].weight, r, init)

    def _init_from_weight(self, name: str, r: int, init: str) -> None:
        """PiSSA / OLoRA: A and B taken from the base weight, which becomes W - scaling * B A (same layout)."""
        if self.is_quantized:
            raise ValueError(
                f"init_lora_weights={init!r} needs the full-precision weight, and this layer is 4-bit (NF4): "
                "initialise on the full-precision model, save its residual weights, and quantise those "
                "(lorakit.quant.linear4bit.quantize_linears); or use init_lora_weights=True")
        A, B, residual = from_weight(init, self.weight_out_in(), r, self.scaling[name])
        with torch.no_grad():
            self.lora_A[name].weight.data = A
            self.lora_B[name].weight.data = B
            self.weight.copy_(residual.T if self.fan_in_fan_out else residual)

    def weight_out_in(self) -> torch.Tensor:
        """The base weight as d_out x d_in, whatever its storage (dequantised if it is 4-bit)."""
        weight = dense_weight(self.base_layer)
        return weight.T if self.fan_in_fan_out else weight

    @property
    def is_quantized(self) -> bool:
        return hasattr(self.base_layer, "dequantize")

    def dequantize_base(self) -> None:
        """Replace a quantised base by an nn.Linear holding its dequantised weight (to merge into)."""
        base = self.base_layer
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                          device=base.weight_packed.device, dtype=base.weight_dtype)
        with torch.no_grad():
            dense.weight.copy_(base.dequantize())
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        dense.requires_grad_(False)
        self._adopt(dense.train(self.training))

    def delta_weight_out_in(self, name: str) -> torch.Tensor:
        return (self.lora_B[name].weight @ self.lora_A[name].weight) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        delta = self.delta_weight_out_in(name)
        return delta.T if self.fan_in_fan_out else delta

    def _weight_norm(self, delta_out_in: torch.Tensor) -> torch.Tensor:
        """Row norms of W + delta (DoRA's ||W'||, one per output feature)."""
        return weight_norm(self.weight_out_in(), delta_out_in)

    def adapter_output(self, x, name, base_out):
        if name not in self.lora_magnitude_vector:
            return lora_delta(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                              self.dropout_p(name))
        return self._dora_output(x.to(self.lora_A[name].weight.dtype), name, base_out)

    def output_with(self, x, name, base_out):
        """The low-rank product is added into base_out inside its GEMM; DoRA's output is computed
        whole (see _dora_result), not as base_out plus a correction."""
        if name not in self.lora_magnitude_vector:
            return lora_delta(x, self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name],
                              self.dropout_p(name), base=base_out)
        return self._dora_result(x.to(self.lora_A[name].weight.dtype), name, base_out)

    def _dora_output(self, x, name, base_out):
        """DoRA as a correction to the base output (when several adapters are active)."""
        return self._dora_result(x, name, base_out) - base_out

    def _dora_result(self, x, name, base_out):
        """DoRA: m * (W x + s B A dropout(x)) / ||W + sBA|| + bias, the layer's output.

        Dropout reaches only the low-rank branch. PEFT instead rescales W dropout(x), computed in a
        second pass through the base weight; both have the same expectation (docs/speed.md)."""
        A, B, s = self.lora_A[name].weight, self.lora_B[name].weight, self.scaling[name]
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):  # the norm in the adapter's precision
            norm = low_rank_weight_norm(self.weight_out_in().to(A.dtype), A, B, s)
        base_no_bias = base_out if self.bias is None else base_out - self.bias
        combined = lora_delta(x, A, B, s, self.dropout_p(name), base=base_no_bias)
        out = dora_scale(combined, self.lora_magnitude_vector[name], norm)
        return out if self.bias is None else out + self.bias

    def merged_weight(self, name):
        if name not in self.lora_magnitude_vector:
            return super().merged_weight(name)
        delta = self.delta_weight_out_in(name)
        norm = self._weight_norm(delta)
        self._dora_merge_norm[name] = norm.detach().clone()
        merged = (self.lora_magnitude_vector[name] / norm).view(-1, 1) * (self.weight_out_in() + delta)
        return merged.T if self.fan_in_fan_out else merged

    def unmerged_weight(self, name):
        if name not in self.lora_magnitude_vector:
            return super().unmerged_weight(name)
        norm = self._dora_merge_norm.pop(name)
        base = self.weight_out_in() * (norm / self.lora_magnitude_vector[name]).view(-1, 1)
        base = base - self.delta_weight_out_in(name)
        return base.T if self.fan_in_fan_out else base


class LoraEmbedding(LoraLayer):
    """nn.Embedding; as in PEFT, A starts at zero and B random, and there is no dropout."""

    def __init__(self, base: nn.Embedding):
        super().__init__(base)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()

    def create_adapter(self, name, r, init) -> None:
        num, dim = self.weight.shape
        A, B = torch.randn(r, num), torch.randn(dim, r)
        if init is not False:
            nn.init.zeros_(A)
            nn.init.normal_(B)
        self.lora_embedding_A[name] = nn.Parameter(A)
        self.lora_embedding_B[name] = nn.Parameter(B)

    def adapter_output(self, x, name, base_out):
        base = self.base_layer
        after_A = F.embedding(x, self.lora_embedding_A[name].T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        return (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]

    def delta_weight(self, name):
        return (self.lora_embedding_B[name] @ self.lora_embedding_A[name]).T * self.scaling[name]


class LoraConv2d(LoraLayer):
    """nn.Conv2d: A is a conv with the base's kernel and stride, B a 1x1 conv."""

    def __init__(self, base: nn.Conv2d):
        if base.groups != 1 or base.dilation != (1, 1):
            raise ValueError(
                f"LoRA on Conv2d supports groups=1 and dilation=1; this layer has groups={base.groups}, "
                f"dilation={base.dilation}. Leave it out of target_modules."
            )
        super().__init__(base)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    def create_adapter(self, name, r, init) -> None:
        base = self.base_layer
        self.lora_A[name] = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding, bias=False)
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, 1, bias=False)
        _init_pair(self.lora_A[name].weight, self.lora_B[name].weight, r, init)

    def adapter_output(self, x, name, base_out):
        A, B = self.lora_A[name], self.lora_B[name]
        return B(A(F.dropout(x.to(A.weight.dtype), self.dropout_p(name)))) * self.scaling[name]

    def delta_weight(self, name):
        A, B = self.lora_A[name].weight, self.lora_B[name].weight
        # Composing conv A (kernel k) with 1x1 conv B is one conv with kernel k: sum_r B[o,r] A[r,i,:,:].
        return torch.einsum("or,rikl->oikl", B[:, :, 0, 0], A) * self.scaling[name]


def lora_layer_class(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer type that can wrap `module`, or None if LoRA cannot target it."""
    if isinstance(module, (nn.Linear, NF4Linear)) or is_conv1d(module):
        return LoraLinear
    if isinstance(module, nn.Embedding):
        return LoraEmbedding
    if isinstance(module, nn.Conv2d):
        return LoraConv2d
    return None


class ModulesToSave(WrapsBase):
    """A module trained in full per adapter: the original stays frozen, each adapter owns a copy."""

    def __init__(self, original: nn.Module):
        super().__init__(original)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.base_layer)

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def forward(self, *args, **kwargs):
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.base_layer(*args, **kwargs)
        trained = self.modules_to_save[self.active_adapter]
        theirs, ours = _float_dtype(self.base_layer), _float_dtype(trained)
        if theirs == ours or theirs is None or ours is None or torch.is_autocast_enabled(_device_type(trained)):
            return trained(*args, **kwargs)
        # A copy trained in another dtype than the frozen model around it (fp32 in a bf16 base without
        # autocast): it takes the model's tensors in its dtype and gives back the original's.
        out = trained(*(a.to(ours) if _is_float(a) else a for a in args),
                    **{k: v.to(ours) if _is_float(v) else v for k, v in kwargs.items()})
        return out.to(theirs) if _is_float(out) else out


def _float_dtype(module: nn.Module) -> torch.dtype | None:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), None)


def _device_type(module: nn.Module) -> str:
    return next((p.device.type for p in module.parameters()), "cpu")


def _is_float(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()
