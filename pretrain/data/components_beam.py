"""Connected components of a graph too large for one machine, as Beam transforms: the near-dedup graph.

Alternating large-star and small-star (Kiveris et al., "Connected Components in MapReduce and
Beyond", SoCC 2014). Nodes are comparable and hashable (here (component name, document key)); the
edges are (larger node, smaller node) pairs. Each round groups edges by node twice; every group holds
one node's neighbours, so a worker's memory is bounded by the largest component, never the graph.
At the end every component is a star around its smallest node, and each other node's one edge
names it: the representative dedup keeps.

Rounds are unrolled: a Beam pipeline is a static graph, and one job of R rounds is simpler to run,
retry and monitor on every runner than a launcher that starts a job per round and carries the edges
between them in files. A round on a converged graph is cheap (its edges are the duplicates, a small
part of the corpus), and the number needed grows as log^2 of a component's size (a 100k-document
chain whose keys follow the chain converges in 17). `converged_or_fail` checks the result and
fails the pipeline with a clear error if it is not a set of stars, rather than keep a wrong set.
"""

from __future__ import annotations

import apache_beam as beam

DEFAULT_ROUNDS = 24


def _large_star(node, neighbours):
  """Every larger neighbour is linked to the smallest of the node's closed neighbourhood."""
  neighbours = set(neighbours)
  smallest = min(neighbours | {node})
  for other in neighbours:
    if other > node:
      yield other, smallest


def _small_star(node, smaller):
  """The node and its smaller neighbours are linked to the smallest of them."""
  smaller = set(smaller)
  smallest = min(smaller)
  for other in smaller | {node}:
    if other != smallest:
      yield other, smallest


class ConnectedComponents(beam.PTransform):
  """(larger, smaller) edges -> (node, its component's smallest node) for every node but the smallest."""

  def __init__(self, rounds: int = DEFAULT_ROUNDS):
    super().__init__()
    self.rounds = rounds

  def expand(self, edges):
    for r in range(self.rounds):
      edges = (edges
               | f"Both ways {r}" >> beam.FlatMap(lambda e: [e, (e[1], e[0])])
               | f"Neighbours {r}" >> beam.GroupByKey()
               | f"Large star {r}" >> beam.FlatMapTuple(_large_star)
               | f"Smaller neighbours {r}" >> beam.GroupByKey()
               | f"Small star {r}" >> beam.FlatMapTuple(_small_star))
    return edges | "Converged" >> converged_or_fail(self.rounds)


def _check_star(node_and_links, rounds: int):
  """A node of a star has one edge, to a node that links to none smaller; else the rounds did not suffice."""
  node, links = node_and_links
  up = {other for kind, other in links if kind == "up"}
  down = any(kind == "down" for kind, _ in links)
  if len(up) > 1 or (up and down):
    raise RuntimeError(f"near-dedup connected components did not converge in {rounds} rounds (node {node} "
                       f"still links to {sorted(up)[:3]}{' and is linked to' if down else ''}); rerun with a "
                       f"larger Beam option --near_dedup_rounds (e.g. {2 * rounds})")
  if up:
    yield node, up.pop()


def converged_or_fail(rounds: int):
  @beam.ptransform_fn
  def check(edges):
    return (edges
            | "Up and down" >> beam.FlatMap(lambda e: [(e[0], ("up", e[1])), (e[1], ("down", e[0]))])
            | "Links" >> beam.GroupByKey()
            | "Stars" >> beam.FlatMap(_check_star, rounds))
  return check()
