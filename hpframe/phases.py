"""Named ranges of a training step (``hpframe/forward``, ``hpframe/optimizer``, ...) for profiles and traces.

The engine marks its phases with ``phase(name)``; ``hpframe.train.profile`` groups a profile's
time by them. Kept out of ``hpframe.train`` so that the engine does not import the training loop's
package.
"""

from __future__ import annotations

from typing import Any

import torch

PHASE_PREFIX = "hpframe/"


def phase(name: str) -> Any:
    """A named range (``hpframe/<name>``) that shows up in profiles and traces; nearly free otherwise."""
    return torch.profiler.record_function(PHASE_PREFIX + name)
