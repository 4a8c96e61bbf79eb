"""Model size (MB) and bit-operations per forward, as in the Q-Diffusion tables.

size = parameters x weight bits / 8e6 (all parameters at the weight bit width, the paper's convention);
bit-ops = sum over Conv2d/Linear of MACs x w_bits x a_bits, plus the attention matmuls (q.k at
a_bits x a_bits, softmax.v at softmax_bits x a_bits) where the model exposes them.
"""
from __future__ import annotations


def collect_layers(model, *example_inputs) -> list[dict]:
    """Per-sample MACs of every Conv2d/Linear (and attention matmul) from one forward with hooks."""
    import torch
    from torch import nn

    from ..models.unet import AttnCore

    layers, hooks = [], []
    batch = example_inputs[0].shape[0]

    def hook(name, mod):
        def fn(m, args, out):
            bits = {}
            if getattr(m, "is_quant_layer", False):
                bits = {"w_bits": m.w_bits, "a_bits": m.a_bits}
                m = m.module
            elif hasattr(m, "softmax_bits"):
                bits = {"a_bits": m.a_bits, "softmax_bits": m.softmax_bits}
            if isinstance(m, nn.Conv2d):
                macs = out[0].numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
                layers.append({"name": name, "kind": "conv", "params": m.weight.numel(), "macs": int(macs), **bits})
            elif isinstance(m, nn.Linear):
                macs = out.numel() // batch * m.in_features
                layers.append({"name": name, "kind": "linear", "params": m.weight.numel(), "macs": int(macs), **bits})
            else:
                c, n = args[0].shape[1], args[0].shape[2]
                layers.append({"name": name + ".qk", "kind": "matmul_qk", "params": 0, "macs": n * n * c, **bits})
                layers.append({"name": name + ".av", "kind": "matmul_av", "params": 0, "macs": n * n * c, **bits})
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear, AttnCore)) or getattr(mod, "is_quant_layer", False):
            hooks.append(mod.register_forward_hook(hook(name, mod)))
    try:
        with torch.no_grad():
            model(*example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return layers


def count_params(model) -> int:
    """Parameters of the standard layers (quantizer state such as AdaRound variables is not counted)."""
    from torch import nn
    kinds = (nn.Conv2d, nn.Linear, nn.GroupNorm, nn.LayerNorm, nn.Embedding)
    return sum(p.numel() for m in model.modules() if isinstance(m, kinds) for p in m.parameters(recurse=False))


def summarize(layers: list[dict], n_params: int, w_bits: int = 32, a_bits: int = 32,
              softmax_bits: int | None = None) -> dict:
    """Size in MB and bit-operations (G) per forward; per-layer "w_bits"/"a_bits" entries override the defaults."""
    softmax_bits = a_bits if softmax_bits is None else softmax_bits
    bitops = 0
    for layer in layers:
        ab = layer.get("a_bits", a_bits)
        if layer["kind"] == "matmul_qk":
            bitops += layer["macs"] * ab * ab
        elif layer["kind"] == "matmul_av":
            bitops += layer["macs"] * layer.get("softmax_bits", softmax_bits) * ab
        else:
            bitops += layer["macs"] * layer.get("w_bits", w_bits) * ab
    return {"params": int(n_params), "macs": int(sum(l["macs"] for l in layers)),
            "size_mb": n_params * w_bits / 8e6, "gbitops": bitops / 1e9}


def model_cost(model, example_inputs: tuple, w_bits: int = 32, a_bits: int = 32,
               softmax_bits: int | None = None) -> dict:
    """:func:`summarize` for a torch model, walking its Conv2d/Linear modules with hooks."""
    n_params = count_params(model)
    return summarize(collect_layers(model, *example_inputs), n_params, w_bits, a_bits, softmax_bits)


