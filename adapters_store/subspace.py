"""Protected input subspaces: what the ``inflora`` method must not touch, stored with a merge.

Why this exists: a task's update ΔW_t = s · B_t A_t acts on *every* input x, so it moves the
earlier tasks' answers unless A_t x_old ≈ 0. ``inflora`` (after GPM, Saha et al. 2021, and
InfLoRA, Liang & Li 2024) keeps, per target module, an orthonormal basis U (d_in × k) of the
input directions the live tasks' inputs occupy, and draws each new task's frozen A in the
orthogonal complement of span(U). This module only stores and reads that basis; it is computed
by the trainer (``trainer/subspace_growth.py``), from the served model's activations.

The basis is cumulative and versioned with the merge it protects: merge ``m<k>`` protects the
directions of every parent of ``m<k>``. A rollback therefore brings back exactly the basis of
that merge; removing a task keeps the previous basis (a superset: the removed task's directions
stay reserved, so no remaining task ever loses protection).

Storage: a merge's ``subspace.safetensors`` holds only the directions it adds to the basis it
grew from, with that merge's id as its parent; loading walks the chain. So a store holds every
direction once, at most d_in per module in all, however many merges it has (a full copy per
merge would cost a 7B model up to 14 GB each). Columns are kept in fp16 (d_in · 2 bytes each)
and the concatenated basis is re-orthonormalized in fp32 on load, so the rounding does not leak
into the projection.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SUBSPACE_FILE = "subspace.safetensors"
_FORMAT = "lamina-subspace"


@dataclass
class Subspace:
    """Per target module, an orthonormal basis U (d_in, k) of the protected input directions.

    ``energy`` is the ε the basis was grown with: for every task it protects, span(U) holds at
    least that fraction of the task's input energy Σ‖x‖² in that module.
    """

    bases: dict[str, torch.Tensor]  # module path -> (d_in, k), orthonormal columns, fp32
    energy: float
    merge_id: str | None = None  # the merge whose file holds this basis, once stored
    grown_from: Subspace | None = None  # the stored basis this one extends (its first columns)

    def dims(self) -> dict[str, int]:
        """k per module: input directions reserved by the live tasks."""
        return {name: int(U.shape[1]) for name, U in self.bases.items()}

    def d_in(self) -> dict[str, int]:
        return {name: int(U.shape[0]) for name, U in self.bases.items()}

    def summary(self) -> dict[str, Any]:
        """What the store's merge meta records (and admission reads without loading tensors)."""
        return {"energy": self.energy, "dims": self.dims(), "d_in": self.d_in()}

    def save(self, directory: Path) -> Path:
        """Write ``subspace.safetensors`` into the merge ``directory`` (which must exist): the
        columns beyond :attr:`grown_from`'s, and that merge's id as the parent to read first."""
        parent = self.grown_from
        if parent is not None and parent.merge_id is None:
            raise ValueError("a subspace can only extend one that is stored with a merge")
        kept = parent.dims() if parent is not None else {}
        tensors = {
            name: U[:, kept.get(name, 0) :].to(torch.float16).contiguous() for name, U in self.bases.items()
        }  # (d_in, k − k_parent) each
        metadata = {
            "format": _FORMAT,
            "energy": repr(self.energy),
            "parent": (parent.merge_id or "") if parent else "",
        }
        path = Path(directory) / SUBSPACE_FILE
        save_file(tensors, str(path), metadata=metadata)
        return path

    def unchanged(self) -> Subspace:
        """The same basis, to be stored with another merge (a removal keeps every direction)."""
        return Subspace(bases=self.bases, energy=self.energy, grown_from=self)

    @classmethod
    def load(cls, directory: Path) -> Subspace:
        """The basis stored with the merge in ``directory``, its parents' columns first."""
        directory = Path(directory)
        columns: dict[str, list[torch.Tensor]] = {}
        energy: float | None = None
        step: Path | None = directory
        while step is not None:
            own, metadata = _read(step / SUBSPACE_FILE)
            energy = float(metadata["energy"]) if energy is None else energy  # the newest ε
            for name, U in own.items():
                columns.setdefault(name, []).insert(0, U.float())
            step = directory.parent / metadata["parent"] if metadata.get("parent") else None
        bases = {name: orthonormalize(torch.cat(parts, dim=1)) for name, parts in columns.items()}
        assert energy is not None
        return cls(bases=bases, energy=energy, merge_id=directory.name)

    @staticmethod
    def exists(directory: Path) -> bool:
        return (Path(directory) / SUBSPACE_FILE).is_file()


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a Lamina subspace file")
        return {name: handle.get_tensor(name) for name in handle.keys()}, metadata  # noqa: SIM118


def orthonormalize(U: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning span(U) (reduced QR); a (d_in, 0) basis stays empty."""
    if U.shape[1] == 0:
        return U
    Q, _ = torch.linalg.qr(U)  # (d_in, k)
    return Q


def free_directions(summary: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(free, d_in) per module from a :meth:`Subspace.summary`: what the next task can use."""
    return {name: (summary["d_in"][name] - k, summary["d_in"][name]) for name, k in summary["dims"].items()}


def occupancy(summary: dict[str, Any]) -> dict[str, Any]:
    """The admin view of a :meth:`Subspace.summary`: per module the reserved share of d_in
    ("subspace occupancy", inflora's capacity), and the fullest module."""
    modules = {
        name: {"reserved": k, "d_in": summary["d_in"][name], "occupancy": k / summary["d_in"][name]}
        for name, k in summary["dims"].items()
    }
    shares = [module["occupancy"] for module in modules.values()]
    return {
        "energy": summary["energy"],
        "occupancy_mean": sum(shares) / len(shares) if shares else None,
        "occupancy_max": max(shares, default=None),
        "free_min": min((m["d_in"] - m["reserved"] for m in modules.values()), default=None),
        "modules": modules,
    }
