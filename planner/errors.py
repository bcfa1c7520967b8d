"""InputError: the base of every bad-input error of the planner and the runtime (exit 2);
InfeasibleError: valid inputs that admit no layout (exit 3).

Invariant: the message is one line, "<prefix><field>: <problem>; <fix>", and `field` names
the input, so a CLI catches InputError and prints the message with exit status 2. Free of
torch and of the rest of tera, so a CLI can import it before anything heavy.
(tera.models.SpecError and tera.topologies.ClusterError keep the same shape on their own:
models and topologies import nothing from the planner.)
"""

from __future__ import annotations


class InputError(ValueError):
    prefix = ""  # e.g. "layout." for LayoutError

    def __init__(self, field_name: str, problem: str, fix: str):
        self.field = field_name
        super().__init__(f"{self.prefix}{field_name}: {problem}; {fix}")


class InfeasibleError(Exception):
    """No layout exists for the problem as posed (or none was found in the time given).

    Not a bad input: every input is valid, they just admit no plan. The message is one
    line, "<problem>; <fix>", and the fix is computed (the fewest GPUs, the longest
    sequence, the recompute or ZeRO setting that does fit), so a CLI prints it with exit
    status 3.
    """

    def __init__(self, problem: str, fix: str):
        self.problem, self.fix = problem, fix
        super().__init__(f"{problem}; {fix}")
