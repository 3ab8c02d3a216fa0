"""Placement: which serving nodes hold which models, computed the same way by every node and the front door.

Pure, no I/O: the fleet's membership is folded from `NodeStatus` heartbeats (`membership`), models
that must sit together are grouped (`groups`), each group is placed on R nodes by weighted
rendezvous hashing (`hashing`), and a node's plan says what it loads and what it keeps during a move
(`plan`). No central scheduler: the same inputs give the same answer everywhere.
"""
