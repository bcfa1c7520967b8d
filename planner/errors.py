"""InputError: the base of every bad-input error of the planner and the runtime.

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
