"""Training steps replayed from CUDA graphs.

One training step of the pipeline's small networks is a few hundred tiny
kernels (each layer, each one-hot group's softmax, their gradients, the
optimiser). On a GPU, launching them from Python through autograd costs far
more than running them: measured on an H200, a step of 1,024 rows took 1.8 ms,
so training ran barely faster than on 2 CPU cores. A CUDA graph records the
whole step once (loss, backward, the optimiser update) and replays it with one
launch: the same kernels on the same addresses, so the same arithmetic.

What a replayed step needs, and :class:`GraphedSteps` provides:

- the batch in a fixed tensor: each step's rows are copied into it;
- the learning rate in a device tensor (the optimiser is built with
  ``capturable=True`` and a tensor ``lr``), set before each replay from the
  same scheduler as the eager loop, so the rate follows the same sequence;
- one graph per batch shape (the last, shorter batch of an epoch has its own),
  each captured after a few eager warm-up steps on a side stream, as the
  PyTorch documentation requires.

Only objectives that draw no random numbers are captured (``Objective.
graph_safe``): a graph replays the random draws it recorded.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.schedule import make_schedule

#: Eager steps of a batch shape before its graph is captured.
WARMUP_STEPS = 3

LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: torch.Tensor  # the step's rows are copied here before a replay
    loss: torch.Tensor
    recon: torch.Tensor
    #: The gradients the graph writes: kept referenced so that their memory
    #: is never handed out while the graph may still replay into it.
    grads: list[torch.Tensor | None]


class GraphedSteps:
    """Optimiser steps of ``loss_fn``, replayed from one CUDA graph per shape.

    Parameters
    ----------
    loss_fn
        Batch (b, n_features) -> (training loss, reconstruction MSE), scalars.
    parameters
        The network's parameters, trained by Adam (fused, capturable).
    lr, weight_decay
        Adam's settings.
    schedule, total_steps
        The learning-rate schedule (:func:`models.schedule.make_schedule`) over
        ``total_steps`` steps.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        parameters: list[torch.nn.Parameter],
        *,
        lr: float,
        weight_decay: float,
        schedule: str,
        total_steps: int,
    ) -> None:
        device = parameters[0].device
        self._loss_fn = loss_fn
        self._lr = torch.tensor(lr, dtype=torch.float32, device=device)
        self.optimizer = torch.optim.Adam(
            parameters,
            lr=self._lr,
            weight_decay=weight_decay,
            fused=True,
            capturable=True,
        )
        # The scheduler runs on a stand-in optimiser with a float rate, so it
        # computes exactly the floats the eager loop's scheduler does; each is
        # then written into the device tensor the graphs read.
        self._shadow = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        self._schedule = make_schedule(self._shadow, schedule, total_steps)
        self._graphs: dict[int, _Graph] = {}
        self._eager_steps: Counter[int] = Counter()
        self._side = torch.cuda.Stream(device=device)

    def step(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on ``batch``; its loss and MSE (device scalars
        of this step only, safe to keep)."""
        rows = batch.shape[0]
        graph = self._graphs.get(rows)
        if graph is None and self._eager_steps[rows] < WARMUP_STEPS:
            self._eager_steps[rows] += 1
            loss, recon = self._eager(batch)
        else:
            if graph is None:
                graph = self._graphs[rows] = self._capture(batch)
            graph.batch.copy_(batch)
            graph.graph.replay()
            loss = graph.loss.clone()
            recon = loss if graph.recon is graph.loss else graph.recon.clone()
        self._advance_rate()
        return loss, recon

    def _eager(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A plain step, on a side stream (warm-up before a capture must not
        run on the stream being captured)."""
        current = torch.cuda.current_stream(batch.device)
        self._side.wait_stream(current)
        with torch.cuda.stream(self._side):
            loss, recon = self._loss_fn(batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        current.wait_stream(self._side)
        done = loss.detach()
        return done, (done if recon is loss else recon.detach())

    def _capture(self, batch: torch.Tensor) -> _Graph:
        static = batch.clone()
        # Gradients are allocated inside the capture, in the graph's own memory.
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss, recon = self._loss_fn(static)
            loss.backward()
            self.optimizer.step()
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        done = loss.detach()
        return _Graph(
            graph, static, done, done if recon is loss else recon.detach(), grads
        )

    def _advance_rate(self) -> None:
        if self._schedule is None:
            return
        with warnings.catch_warnings():
            # The stand-in optimiser never steps; the scheduler warns about it.
            warnings.simplefilter("ignore", UserWarning)
            self._schedule.step()
        self._lr.fill_(self._shadow.param_groups[0]["lr"])
