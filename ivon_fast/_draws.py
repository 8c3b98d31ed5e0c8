"""The optimizer's draw counter: the training and evaluation draw numbers, on the host and (with
``capturable=True``) on the device.

Training draws are 0, 1, 2, ...; evaluation draws ``EVAL_DRAW_BASE + 0, 1, 2, ...`` (docs/DESIGN.md
section 3). Every op's draw arguments come from ``Draws.op_kwargs``, so the kernels see either the
host's numbers or the device's counter, never a mix.

Note [capturable steps]: with capturable=True the kernels never see a training draw number as a
launch argument. ``device`` holds [d, d + 1] on the params' device, d the last training draw
taken (-1 before the first); taking a draw adds 1 to both, on the device, so a captured graph
takes fresh draws at every replay. A training draw's op gets draw=0 and device_draws (sample /
accumulate: [d]; update: [d, d + 1], the pending sample's draw and the next sample's). Every
update gets them, also one without a pending sample and without a next one (the official loop
with all samples folded in): bf16 state rounds with the bits of draw [d + 1] (the reference's
round_draw), which is exactly the host's rounding index, one more than the step's last training
draw: ``next_train`` in the official loop, and in the drop-in step the next draw, taken on the
host only until the update has read [d + 1] (``take_train(on_device=False)``, then
``advance_device`` after the update). The host's round_draw is then passed as 0, like the draws,
so a replayed update rounds with fresh bits. The host's counters keep the state machine's
bookkeeping; after graph replays they lag behind the device, whose values ``settle_host`` copies
back (state_dict). Evaluation draws stay on the host.
"""
from __future__ import annotations

from typing import Optional

import torch

from .noise import EVAL_DRAW_BASE
from .scalars import to_device


class Draws:
    """The next training and evaluation draw numbers, and the capturable device counter."""

    def __init__(self):
        self.next_train = 0
        self.next_eval = 0
        self.device: Optional[torch.Tensor] = None  # capturable: [d, d + 1] (Note above)

    def pin_to_device(self, device: torch.device) -> None:
        """Capturable: keep [d, d + 1] on ``device`` from now on (the same tensor for good)."""
        self.device = torch.tensor([self.next_train - 1, self.next_train], dtype=torch.int64,
                                   device=device)

    def take_train(self, on_device: bool = True) -> int:
        """The next training draw number. Capturable: the device's counter advances too
        (``on_device``; the drop-in step advances it after its update has read it)."""
        draw = self.next_train
        self.next_train += 1
        if on_device and self.device is not None:
            self.device.add_(1)
        return draw

    def untake_train(self) -> None:
        """Give back the last training draw (its sample did not count)."""
        self.next_train -= 1
        if self.device is not None:
            self.device.sub_(1)

    def take_eval(self) -> int:
        draw = EVAL_DRAW_BASE + self.next_eval
        self.next_eval += 1
        return draw

    def untake_eval(self) -> None:
        self.next_eval -= 1

    def advance_device(self) -> None:
        """Capturable drop-in step: the next sample, just written by the update, is now the
        pending one on the device too."""
        if self.device is not None:
            self.device.add_(1)

    def op_kwargs(self, draw, device: torch.device, *, update: bool = False,
                  next_draw=None) -> dict:
        """The draw arguments of an op on ``device``: host numbers, or the device's draws (every
        update, and every op of a training draw, when capturable)."""
        training = draw is not None and draw < EVAL_DRAW_BASE
        if self.device is None or not (training or update):
            kwargs = {"draw": 0 if draw is None else draw}
            if update:
                kwargs["next_draw"] = next_draw
            return kwargs
        draws = self.device
        if draws.device != device:
            draws = to_device(draws, device)
        if update:
            return {"draw": 0, "next_draw": None if next_draw is None else 0,
                    "device_draws": draws}
        return {"draw": 0, "device_draws": draws[:1]}

    def settle_host(self, pending: Optional[int]) -> Optional[int]:
        """Capturable: the host's training counter from the device's (graph replays advanced
        it; waits for the device). Returns the pending draw (the last one taken) as the device
        knows it."""
        if self.device is None:
            return pending
        self.next_train = int(self.device[1].item())
        return None if pending is None else self.next_train - 1

    def set_on_host(self, next_train: int, next_eval: int) -> None:
        """Set both counters (load_state_dict); capturable: the device's in place, so a graph
        captured earlier stays valid."""
        self.next_train, self.next_eval = next_train, next_eval
        if self.device is not None:
            self.device.copy_(torch.tensor([next_train - 1, next_train], dtype=torch.int64))

    def snapshot(self) -> tuple:
        """What ``restore`` puts back (a step(closure) that fails)."""
        return self.next_train, None if self.device is None else self.device.clone()

    def restore(self, snapshot: tuple) -> None:
        self.next_train, device = snapshot
        if device is not None:
            self.device.copy_(device)
