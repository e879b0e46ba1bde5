"""The training noise's own random generators (one per device): independent of whatever else
draws random numbers, so the noise is checkpointed with the run and alike on every DDP rank."""
from __future__ import annotations

import torch

from .._validate import check_number

MAX_SEED = 2**63 - 1  # torch.Generator seeds and the int64 tensor the checkpoint stores it in


class NoiseGenerators:
    """Generators seeded with ``seed``, created per device on first use; ``seed=None``: none (torch's global RNG)."""

    def __init__(self) -> None:
        self.seed: int | None = None
        self._generators: dict[torch.device, torch.Generator] = {}

    def reseed(self, seed: int | None) -> None:
        if seed is not None:
            check_number("seed", seed, low=0, high=MAX_SEED, integer=True)
        self.seed = seed
        self._generators.clear()

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device).manual_seed(self.seed)
        return generator

    def state(self) -> dict[str, torch.Tensor]:
        """The seed (key ``"seed"``) and each generator's state by device name; empty without a seed.
        Tensors only, so checkpoints load with ``weights_only=True``."""
        if self.seed is None:
            return {}
        return {"seed": torch.tensor(self.seed), **{str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned: the seed, then each generator's state."""
        if "seed" in state:
            self.reseed(int(state["seed"]))
        if self.seed is None:
            raise RuntimeError("set_noise_rng_state: no seed in the state and seed_noise(seed) not called")
        for name, value in state.items():
            if name == "seed":
                continue
            device = torch.device(name)
            if device.type == "cuda" and not torch.cuda.is_available():
                continue  # resumed without the GPU it was saved on: that device's stream starts anew
            self.generator(device).set_state(value.cpu())
