"""Degradation Recording's node placement: which stage-1 checkpoints become the path's nodes.

steps      every K_1/N steps, as the paper does. The degrading model leaves the teacher within the first few percent
           of stage 1, so these nodes all lie near the initial generator and the generator gains little from them.
geometric  at steps round(K_1^(k/N)): dense early, where the model moves fastest.
distance   node k where the model has gone k/N of the way from the teacher to where it ends, so that nodes are evenly
           spaced in distribution. The distance is measured on a fixed probe batch (DistanceProbe) at probe steps that
           are dense early; the end point is only known at the end, so a bounded set of candidate checkpoints, spread
           evenly in distance, is held in CPU memory and the nodes are chosen from it when stage 1 finishes.
           With ``degrade.plateau`` > 0, stage 1 ends as soon as the distance stops growing.

Every node's measured distance goes into the manifest, whatever the spacing.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from disback.config import EDMConfig
from disback.diffusion.losses import weighted_mse
from disback.diffusion.sampling import karras_schedule
from disback.distributed import full_state, load_full_state, mean_across
from disback.errors import DisbackError
from disback.method.path import DegradationPath
from disback.storage.meta import ModelMeta


class DistanceProbe:
    """d(psi) = mean over a fixed probe batch of lambda(sigma) ||D_psi(x; sigma) - D_theta(x; sigma)||^2 / dim.

    x = x0 + sigma n with x0 drawn once from the initial generator (where the degrading model is trained) and one
    sigma per sample, spread over the Karras schedule; the teacher's outputs are computed once. A probe costs one
    forward pass of the degrading model, about a third of a training step.
    """

    def __init__(
        self, teacher: nn.Module, x0: torch.Tensor, labels: torch.Tensor | None, edm: EDMConfig, seed: int = 0
    ):
        n = len(x0)
        self.sigma = karras_schedule(n, edm.sigma_min, edm.sigma_max, edm.rho)[:n].to(x0.dtype).to(x0.device)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0.device)
        self.x = x0 + self.sigma.reshape(-1, *([1] * (x0.ndim - 1))) * noise
        self.labels, self.sigma_data = labels, edm.sigma_data
        self.reference = self._outputs(teacher)

    @torch.no_grad()
    def _outputs(self, model: nn.Module) -> torch.Tensor:
        was_training = model.training
        out = model.eval()(self.x, self.sigma, self.labels)
        model.train(was_training)
        return out

    def __call__(self, model: nn.Module) -> float:
        """The distance; under several processes their mean, so that every process places nodes and stops alike."""
        value = weighted_mse(self._outputs(model), self.reference, self.sigma, self.sigma_data).item()
        return mean_across({"distance": value})["distance"]


def probe_steps(steps: int, probes: int) -> list[int]:
    """About ``probes`` stage-1 steps, geometrically spaced from 1 to ``steps`` (dense where the model moves fast)."""
    return sorted({max(1, round(steps ** (j / max(probes - 1, 1)))) for j in range(probes)} | {steps})


def check_probes(steps: int, probes: int, nodes: int, plateau: float) -> set[int]:
    """The stage-1 steps at which distance spacing measures (degrade.probes, 0 = 16 per node), if there are enough
    of them to place ``nodes`` nodes (twice as many with the plateau stop, which compares with half-way)."""
    at = set(probe_steps(steps, probes or 16 * nodes))
    needed = 2 * nodes if plateau else nodes
    if len(at) < needed:
        raise DisbackError(
            f"distance spacing needs at least {needed} distinct probe steps, and degrade.probes={probes} "
            f"over {steps} stage-1 steps gives {len(at)}; raise degrade.probes (0 = 16 per node) or degrade.steps"
        )
    return at


def node_steps(spacing: str, steps: int, nodes: int) -> list[int]:
    """Stage-1 steps of nodes 1..N for the step-based spacings; the last one is the length of stage 1."""
    if spacing == "steps":
        every = steps // nodes
        return [every * k for k in range(1, nodes + 1)]
    if spacing == "geometric":
        out: list[int] = []
        for k in range(1, nodes + 1):
            out.append(max(round(steps ** (k / nodes)), out[-1] + 1 if out else 1))
        return [min(s, steps - (nodes - i - 1)) for i, s in enumerate(out)]  # strictly increasing, last = steps
    raise ValueError(f"no fixed node steps for spacing '{spacing}'")


class StepRecorder:
    """A loop callback that saves a node at each of the given steps, with its measured distance."""

    def __init__(self, path: DegradationPath, model: nn.Module, at: list[int], meta: ModelMeta, probe: DistanceProbe):
        self.path, self.model, self.at, self.meta, self.probe = path, model, set(at), meta, probe

    def on_step_end(self, step: int, task) -> None:
        if step in self.at:
            self.path.add_node(self.model, step, self.meta, self.probe(self.model))

    def finish(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"nodes": self.path.node_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.path.restore_nodes(state["nodes"])


class DistanceRecorder:
    """A loop callback that places nodes evenly in distance from the teacher (see the module's docstring)."""

    def __init__(
        self,
        path: DegradationPath,
        model: nn.Module,
        nodes: int,
        steps: int,
        probes: int,
        candidates: int,
        meta: ModelMeta,
        probe: DistanceProbe,
        plateau: float = 0.0,
    ):
        self.path, self.model, self.nodes, self.meta, self.probe = path, model, nodes, meta, probe
        self.plateau = plateau
        self.at = check_probes(steps, probes, nodes, plateau)
        self.capacity = max(candidates * nodes, nodes) + 1
        self.candidates: list[tuple[int, float, dict[str, torch.Tensor]]] = []  # (step, distance, CPU weights)
        self.probed: list[tuple[int, float]] = []  # every measurement, thinned or not: the plateau test reads it

    def on_step_end(self, step: int, task) -> bool:
        if step not in self.at:
            return False
        distance = self.probe(self.model)
        self.probed.append((step, distance))
        weights = full_state(self.model)  # sharded (run.fsdp): the main process alone keeps the candidates
        self.candidates.append((step, distance, {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}))
        if len(self.candidates) > self.capacity:
            self._thin()
        return self.at_plateau(step, distance)

    def at_plateau(self, step: int, distance: float) -> bool:
        """True when the distance grew by less than ``plateau`` of itself over the second half of the steps so far:
        the model has reached where it ends, and further stage-1 steps only cost time."""
        if not self.plateau or len(self.probed) < 2 * self.nodes:
            return False
        half = next((d for s, d in reversed(self.probed) if s <= step // 2), 0.0)  # the distance at about step/2
        return distance - half < self.plateau * distance

    def state_dict(self) -> dict[str, Any]:
        return {
            "nodes": self.path.node_states(),
            "probed": [list(p) for p in self.probed],
            "candidates": [{"step": s, "distance": d, "weights": w} for s, d, w in self.candidates],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.path.restore_nodes(state["nodes"])
        self.probed = [tuple(p) for p in state["probed"]]
        self.candidates = [(c["step"], c["distance"], c["weights"]) for c in state["candidates"]]

    def _thin(self) -> None:
        """Drop the candidate whose removal leaves the smallest gap in distance (never the newest): the survivors stay
        spread over [0, current distance] however far the model goes."""
        d = [0.0] + [c[1] for c in self.candidates]  # the teacher (distance 0) anchors the lower end
        gaps = [abs(d[i + 2] - d[i]) for i in range(len(self.candidates) - 1)]
        del self.candidates[min(range(len(gaps)), key=gaps.__getitem__)]

    def finish(self) -> None:
        """Write nodes 1..N: node N is the last checkpoint; node k the candidate nearest k/N of its distance."""
        end = self.candidates[-1][1]  # __init__ made sure there are at least N probes, hence N candidates
        chosen, start = [], 0
        for k in range(1, self.nodes):
            # Leave at least one candidate for each later node, and keep the nodes in step order.
            pool = range(start, len(self.candidates) - (self.nodes - k))
            best = min(pool, key=lambda i: abs(self.candidates[i][1] - end * k / self.nodes))
            chosen.append(best)
            start = best + 1
        chosen.append(len(self.candidates) - 1)
        live = {k: v.clone() for k, v in full_state(self.model).items()}
        for i in chosen:
            step, distance, state = self.candidates[i]
            load_full_state(self.model, state)
            self.path.add_node(self.model, step, self.meta, distance)
        load_full_state(self.model, live)
        self.candidates = []


def evenness(distances: list[float]) -> float:
    """Largest deviation of nodes 1..N's distances from k/N of the last one, as a fraction of the last one."""
    n, end = len(distances) - 1, distances[-1]
    if n < 1 or not end > 0 or not math.isfinite(end):
        return math.inf
    return max(abs(d - end * k / n) for k, d in enumerate(distances)) / end
