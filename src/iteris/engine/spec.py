"""What a method asks the engine to gather: one frozen value instead of a row of flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class CaptureSpec:
    """The statistics one sweep gathers for every task and layer group (``GroupStats``).

    paired:      pair each adapter's own model with the merged model token by token (X~ the merged model's
                 inputs); otherwise the adapter's own model alone (X~ = X).
    gamma:       Xh = (1 - gamma) X~ + gamma X.
    cross:       "norm" gathers ||X^T Xh||_F, "keep" also keeps X^T Xh (d_in x d_in); "none" neither.
    out_norms:   each member's output norm ||X W^T||^2 in the adapter's own model.
    rows:        keep each group's inputs themselves rather than their Gram: "auto" while all tasks' tokens
                 stay below d_in, "always"; None never (nor with cross "keep").
    projections: A_m X^T Xh for each member m (the adapters' own A).
    remember:    (unpaired sweeps walked block by block) keep each adapter's rows projected on its A, so later
                 paired sweeps that need nothing else of the adapters' own models skip running them.
    """

    paired: bool = False
    gamma: float = 0.0
    cross: Literal["none", "norm", "keep"] = "none"
    out_norms: bool = False
    rows: Literal["auto", "always"] | None = None
    projections: bool = True
    remember: bool = False

    @property
    def wants_cross_norm(self) -> bool:
        return self.cross != "none"

    @property
    def keeps_cross(self) -> bool:
        return self.cross == "keep"

    @property
    def accumulates_cross(self) -> bool:
        """X^T Xh is summed as a matrix of its own (unpaired, it is the Gram)."""
        return self.cross != "none" and self.paired

    @property
    def row_mode(self) -> str | None:
        return None if self.keeps_cross else self.rows

    @property
    def needs_own_models(self) -> bool:
        """False where a paired sweep needs of each adapter's own model only its rows projected on A (gamma 0,
        no cross term): remembered by an earlier sweep, they spare running the own models at all."""
        return not (self.paired and self.gamma == 0.0 and self.cross == "none" and self.projections)

    def replace(self, **changes) -> CaptureSpec:
        return dataclasses.replace(self, **changes)
