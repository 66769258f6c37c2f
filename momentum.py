"""The momentum (EMA) teacher and the queues of its features.

The teacher is an exponential moving average of the whole student, projections and temperature
included. It is never trained: it is not in the optimizer, none of its parameters requires a
gradient, and it always runs in eval mode so dropout never perturbs its targets.

The queues keep teacher features from earlier optimizer steps as extra negatives (MoCo's memory
queue), each with the group id of its pair so that false negatives can be masked.
"""

import copy

import torch
import torch.nn as nn


class EMATeacher(nn.Module):
    """An EMA copy of a student: theta_t <- m * theta_t + (1 - m) * theta_s, buffers included."""

    def __init__(self, student: nn.Module, momentum: float = 0.995, warmup: bool = False):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.warmup = warmup
        self.model = copy.deepcopy(student)
        self.model.requires_grad_(False)
        self.model.eval()
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))  # one per optimizer step

    def train(self, mode: bool = True) -> "EMATeacher":
        # The teacher stays in eval mode whatever its parent module is switched to.
        super().train(mode)
        self.model.eval()
        return self

    def current_momentum(self) -> float:
        """The momentum of the next update: fixed, or with warm-up min(m, (1 + n) / (10 + n)).

        Warm-up (the num_updates rule of TensorFlow's ExponentialMovingAverage) lets a teacher
        that starts from a random student follow it closely at first. With a fixed m, the teacher
        keeps weight m ** n on its random initialisation after n updates.
        NOTE: it is off by default because it did not help on the synthetic data: one 400-step run
        learned no faster than a fixed momentum, and a 512-step msd run collapsed to chance with it.
        """
        if not self.warmup:
            return self.momentum
        n = int(self.updates)
        return min(self.momentum, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """Move every parameter and floating-point buffer one EMA step towards the student."""
        m = self.current_momentum()
        for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
            t.lerp_(s.detach(), 1.0 - m)  # t + (1 - m) * (s - t) = m * t + (1 - m) * s
        for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
            if t.is_floating_point():
                t.lerp_(s.detach(), 1.0 - m)
            else:
                t.copy_(s)  # integer buffers (counters) cannot be averaged; take the student's
        self.updates.add_(1)

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.model(*args, **kwargs)


class FeatureQueue(nn.Module):
    """A ring buffer of L2-normalised features and their group ids.

    Registered buffers, so the features, the write pointer and the fill count are saved in the
    state dict. Only written slots are ever returned.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 0:
            raise ValueError(f"queue size must be >= 0, got {size}")
        self.size = size
        self.register_buffer("features", torch.zeros(size, dim))
        self.register_buffer("groups", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))    # next slot to write
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # slots written so far, <= size

    def contents(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the written features (n, D) and group ids (n,), n = min(count, size).

        Order is by slot, not by age; the loss does not depend on the order of negatives.
        """
        n = int(self.count)
        return self.features[:n], self.groups[:n]

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, groups: torch.Tensor) -> None:
        """Write rows at the pointer, wrapping around; of more rows than the queue holds, keep the newest."""
        if self.size == 0:
            return
        features, groups = features.detach(), groups.detach()
        if features.shape[0] > self.size:
            features, groups = features[-self.size:], groups[-self.size:]
        n = features.shape[0]
        slots = (int(self.ptr) + torch.arange(n, device=self.ptr.device)) % self.size
        self.features[slots] = features.to(self.features.dtype)
        self.groups[slots] = groups.to(self.groups.device)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.count.copy_(torch.clamp(self.count + n, max=self.size))

    def ordered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the written rows from oldest to newest (for inspection and tests)."""
        n = int(self.count)
        if n < self.size:
            return self.features[:n], self.groups[:n]
        order = (int(self.ptr) + torch.arange(self.size, device=self.ptr.device)) % self.size
        return self.features[order], self.groups[order]
