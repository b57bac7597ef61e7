"""Attribution graphs: trace one prompt through a CLT in its local replacement model, prune, score, intervene.

``attribute`` builds an ``AttributionGraph``; ``intervene`` checks a circuit by changing features and re-running.
Definitions follow Ameisen et al. (2025) as circuit-tracer 0.5.0 implements them.
"""

from .attribute import attribute
from .graph import AttributionGraph, GraphScores, Node, PruneResult
from .intervene import Intervention, InterventionResult, intervene
from .local import LocalReplacement

__all__ = [
    "AttributionGraph",
    "GraphScores",
    "Intervention",
    "InterventionResult",
    "LocalReplacement",
    "Node",
    "PruneResult",
    "attribute",
    "intervene",
]
