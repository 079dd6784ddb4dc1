"""After every weight push, a cheap check that the engine holds what the trainer pushed.

An engine with its own copy of the weights can go on sampling old ones without any error (verl#7495: a LoRA adapter
never synced for two months, read as staleness). So every push records a few elements of some tensors as they
stream past (`PushedSample`), the engine reads the same elements back from its own parameters, and a difference
stops the run naming the tensor. The probed tensors are those HF and vLLM name and lay out alike: every norm, the
attention output and MLP down projections, the embedding and LM head; fused ones (vLLM's qkv and gate-up) are not
probed. vLLM on CPU repacks its linear weights into a layout of its own (the parameter it leaves is empty): there
the check reads the norms, embedding and LM head, which full fine-tuning moves but LoRA does not. The trainer's
values are cast to the engine's dtype, as its weight loader casts them, so equality is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

#: name endings of the tensors the check reads: several per decoder layer in Llama-style models
PROBED = ("norm.weight", "o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")
#: elements read per probed tensor, spread evenly over it
ELEMENTS = 64


class WeightSyncError(RuntimeError):
    """The engine does not hold the weights just pushed to it."""


def element_positions(shape: torch.Size, count: int = ELEMENTS) -> torch.Tensor:
    """`count` positions [count, ndim] spread evenly over a tensor of `shape` (every element when it has fewer),
    as indices per dimension, so that an engine whose copy has padded rows (vLLM's vocabulary) reads the same
    elements."""
    total = shape.numel()
    flat = torch.linspace(0, total - 1, steps=min(count, total)).round().long()
    return torch.stack(torch.unravel_index(flat, shape), dim=-1)


@dataclass
class PushedSample:
    """The probed tensors' positions and the values the trainer pushed there."""

    positions: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def recording(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """The weights, unchanged, noting the probed elements as they pass."""
        for name, tensor in weights:
            if name.endswith(PROBED) and name not in self.positions:
                positions = element_positions(tensor.shape)
                self.positions[name] = positions
                self.values[name] = tensor.detach()[tuple(positions.T)].cpu()
            yield name, tensor

    def check_all(self, copies: dict[str, dict[str, torch.Tensor | None]], step: int) -> None:
        """`check` of every copy of the weights an engine samples from (a server's replicas), by where it is."""
        for holder, engine_values in copies.items():
            self.check(engine_values, step, holder=holder)

    def check(self, engine_values: dict[str, torch.Tensor | None], step: int, *, holder: str = "the engine") -> None:
        """Stops the run at the first probed tensor the engine does not hold as pushed; `engine_values` holds None
        for a tensor the engine keeps in a layout of its own, which is not compared."""
        compared = 0
        for name, pushed in self.values.items():
            if name not in engine_values:
                raise WeightSyncError(f"with the weights of step {step}: {holder} has no parameter {name}")
            held = engine_values[name]
            if held is None:
                continue
            compared += 1
            expected = pushed.to(held.dtype)
            differ = expected != held
            if differ.any():
                largest = (expected.float() - held.float()).abs().max().item()
                raise WeightSyncError(
                    f"with the weights of step {step}: {holder}'s {name} is not the trainer's "
                    f"({int(differ.sum())} of {len(held)} sampled elements differ, largest difference {largest:.3g}); "
                    "the engine would sample weights that were not trained"
                )
        if not compared:
            raise WeightSyncError(
                f"the weights of step {step} have none of the tensors the check reads (names ending in "
                f"{', '.join(PROBED)}) in a layout {holder} keeps: cannot tell whether it holds the trained weights"
            )


def read_elements(model: torch.nn.Module, positions: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    """The elements at `positions` of the model's own parameters (an engine's side of the check): None for a
    parameter kept in another layout (vLLM on CPU empties its repacked linear weights); names it does not have are
    left out."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    return {
        name: None
        if parameters[name].numel() == 0
        else parameters[name].detach()[tuple(index.to(parameters[name].device).T)].cpu()
        for name, index in positions.items()
        if name in parameters
    }
