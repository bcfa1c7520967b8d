"""ClusterError: the one exception a bad cluster description raises.

Invariant: the message is exactly "<field>: <problem>; <fix>" and `field` names the YAML
field (dotted, e.g. "network.oversubscription"), so a CLI can print it as one line.
"""

from __future__ import annotations


class ClusterError(ValueError):
    """A cluster description is malformed. The message names the field and the fix."""

    def __init__(self, field: str, problem: str, fix: str, *, line: int | None = None):
        self.field = field
        self.problem = problem
        self.fix = fix
        self.line = line  # 1-based YAML line, when the error comes from the parser
        super().__init__(f"{field}: {problem}; {fix}")
