"""The fast tier's pure parts (no processes): which rank sends which part at recovery, and which
replicas are sent again after it."""

from __future__ import annotations

from hpframe.checkpoint.memory import recovery_moves, replica_gaps, replica_targets


def _holders(world: int, gpn: int, replicas: int, lost: set[int]) -> dict[int, list[int]]:
    """Nodes holding each rank's part after a snapshot (own node + replica nodes), less the lost nodes."""
    nodes = -(-world // gpn)
    out = {}
    for r in range(world):
        held = {r // gpn} | {t // gpn for t in replica_targets(r, gpn, nodes, replicas)}
        out[r] = sorted(held - lost)
    return out


def test_nothing_moves_when_every_node_kept_its_memory():
    # 4 nodes of 2 ranks: each node holds its own parts and a replica of the previous node's
    assert recovery_moves(_holders(8, 2, 1, lost=set()), 2, 8) == {}


def test_a_lost_node_receives_its_own_ranks_parts_only():
    # node 1 (ranks 2, 3) lost: its parts' replicas are on node 2, and go from the same local index
    assert recovery_moves(_holders(8, 2, 1, lost={1}), 2, 8) == {2: 4, 3: 5}
    # one rank per node, two replicas, nodes 0 and 3 lost: the lowest node still holding each part sends it
    assert recovery_moves(_holders(4, 1, 2, lost={0, 3}), 1, 4) == {0: 1, 3: 1}


def test_replicas_a_lost_node_held_are_sent_again():
    # nothing lost: every replica is in place
    assert replica_gaps(_holders(8, 2, 1, lost=set()), 2, 4, 1) == {}
    # 4 nodes of 2, node 1 lost: it held the replicas of node 0's ranks (0, 1); node 2 keeps node 1's
    assert replica_gaps(_holders(8, 2, 1, lost={1}), 2, 4, 1) == {0: [2], 1: [3]}
    # one rank per node, two replicas, nodes 0 and 3 lost: rank 1's replicas lived on 2 and 3, rank 2's
    # on 3 and 0, rank 3's on 0 and 1, rank 0's on 1 and 2 (kept)
    assert replica_gaps(_holders(4, 1, 2, lost={0, 3}), 1, 4, 2) == {1: [3], 2: [3, 0], 3: [0]}
    # a single node has no replica targets: nothing to send
    assert replica_gaps(_holders(2, 2, 1, lost=set()), 2, 1, 1) == {}
