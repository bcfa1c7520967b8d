"""tera.planner.solve: the layout search, CP-SAT over the whole layout space.

Modules:
  space.py    the configurations of degrees, ZeRO stage, micro-batch and GPU count
  tables.py   integer cost tables of one configuration and the objective they define
  model.py    the CP-SAT formulation (variables, linearisation, what is exact)
  search.py   bound-ordered rounds of CP-SAT solves, top-K and the certificate
  enumerate.py  exhaustive enumeration of the same space (tests and bench/solver.py)
"""

from tera.planner.solve.search import Certificate, RankedPlan, SearchError, SearchResult, search

__all__ = ["Certificate", "RankedPlan", "SearchError", "SearchResult", "search"]
