"""A seedable random stream that is module state: its seed and current generator state are in ``state_dict()``.

Used by every component that draws random numbers during training (sampling miners, synthesis), so a resumed
run draws exactly the numbers the uninterrupted run would have drawn.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


class RandomSource(nn.Module):
    """A ``torch.Generator`` whose seed *and current state* are saved in ``state_dict()`` (as extra state).

    Saving the state means a resumed run draws exactly the numbers the uninterrupted run would have drawn. The
    generator lives on the device of the tensors it is asked to produce; moving to another device re-seeds it
    deterministically from the current generator, so CPU and CUDA streams differ but each is reproducible.
    """

    def __init__(self, seed: int | None = 0) -> None:
        super().__init__()
        self.seed = int(torch.seed() if seed is None else seed) % (2**63)
        self._generator: torch.Generator | None = None

    def manual_seed(self, seed: int) -> None:
        """Restart the stream from ``seed`` (on the generator's current device)."""
        self.seed = int(seed)
        device = self._generator.device if self._generator is not None else torch.device("cpu")
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(self.seed)

    def generator(self, device: torch.device | str) -> torch.Generator:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        gen = self._generator
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
        elif gen.device != device:
            # derive the new stream from the old one, so the switch itself is deterministic
            new_seed = int(torch.randint(0, 2**62, (1,), generator=gen, device=gen.device).item())
            gen = torch.Generator(device=device)
            gen.manual_seed(new_seed)
        self._generator = gen
        return gen

    def get_extra_state(self) -> dict[str, Any]:
        gen = self._generator
        return {
            "seed": self.seed,
            "device": None if gen is None else str(gen.device),
            "state": None if gen is None else gen.get_state(),
        }

    def set_extra_state(self, state: Mapping[str, Any]) -> None:
        self.seed = int(state["seed"])
        if state.get("state") is None:
            self._generator = None
            return
        device = torch.device(state["device"])
        if device.type == "cuda" and not torch.cuda.is_available():
            # e.g. a GPU checkpoint opened on a CPU machine for evaluation: keep loading, restart the stream
            warnings.warn(
                "RandomSource: the saved generator state is a CUDA state but CUDA is not available; the random "
                f"stream restarts from seed {self.seed}, so synthesis draws differ from the saved run",
                RuntimeWarning,
                stacklevel=2,
            )
            self._generator = None
            return
        gen = torch.Generator(device=device)
        gen.set_state(state["state"].cpu() if isinstance(state["state"], Tensor) else state["state"])
        self._generator = gen
